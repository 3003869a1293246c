"""Model registry: name -> torch.nn.Module builder.

Owns: the models a sweep can name. Input shape and class count come from the
workload's data, so one builder serves every dataset of that form. The ResNets are
torchvision's (He et al. 2016; downsampling on the 3x3 conv of a Bottleneck, "v1.5",
as in MLPerf), built untrained with ``zero_init_residual=True``: the last BatchNorm
gamma of every residual block starts at 0, so each block starts as the identity
(Goyal et al. 2017, section 5.1), which steadies large-batch training with warmup.
``resnet18_cifar`` is the CIFAR form: a 3x3 stride-1 stem and no max-pool, for 32x32
inputs. Which models fit which workload is the workload registry's business
(``WorkloadInfo.models``).

Must not import: ray, pandas; torchvision only inside the ResNet builders (importing it
costs ~2 s, which the small models, config validation and the CLI must not pay).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from bench.lm.model import SIZES as GPT_SIZES
from bench.lm.model import build_gpt


class MLP(nn.Module):
    """Flatten -> Linear(hidden) -> ReLU -> Linear(classes). Hidden layer He-uniform (Keras
    'he_uniform': U(+-sqrt(6/fan_in))), output Glorot-uniform, biases zero: the initialisation
    of the classic blobs batch-size experiment."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 50) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, num_classes)
        nn.init.kaiming_uniform_(self.hidden.weight, nonlinearity="relu")  # bound sqrt(6/fan_in)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.hidden.bias)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x.flatten(1))))


class SmallCNN(nn.Module):
    """A fast CNN for small images: conv-bn-relu blocks with pooling, then a linear head.
    Channel widths double per block; works for 8x8 (digits) and 32x32 inputs."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, num_blocks: int | None = None,
                 image_size: int = 32) -> None:
        super().__init__()
        blocks = num_blocks or max(1, min(3, int(math.log2(image_size)) - 2))
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(blocks):
            c_out = width * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]


def _stem_conv(in_channels: int, kernel: int, stride: int) -> nn.Conv2d:
    """A replacement first conv, initialised as torchvision initialises its convs."""
    conv = nn.Conv2d(in_channels, 64, kernel, stride=stride, padding=kernel // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


def _torchvision_resnet(arch: str, num_classes: int, in_channels: int = 3, cifar_stem: bool = False) -> nn.Module:
    """torchvision's ``arch`` (untrained, zero-init residuals); ``cifar_stem``: conv1 3x3 stride 1
    and no max-pool; another channel count than 3 gets a first conv of that many inputs."""
    from torchvision import models

    model = getattr(models, arch)(weights=None, num_classes=num_classes, zero_init_residual=True)
    if cifar_stem:
        model.conv1, model.maxpool = _stem_conv(in_channels, 3, 1), nn.Identity()
    elif in_channels != 3:
        model.conv1 = _stem_conv(in_channels, 7, 2)
    return model


def resnet18_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2]."""
    return _torchvision_resnet("resnet18", num_classes, in_channels, cifar_stem=True)


def resnet18(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-18, ImageNet form (a lighter model for the imagenet workload)."""
    return _torchvision_resnet("resnet18", num_classes, in_channels)


def resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    """ResNet-50 v1.5, ImageNet form: Bottleneck blocks [3, 4, 6, 3]."""
    return _torchvision_resnet("resnet50", num_classes, in_channels)


def _image_model(build: Callable[..., nn.Module]) -> ModelBuilder:
    """A builder for (C, H, W) inputs that says so instead of failing deep inside a conv."""
    def builder(shape: tuple[int, ...], num_classes: int) -> nn.Module:
        if len(shape) != 3:
            raise ValueError(f"{build.__name__} needs image inputs (C, H, W), got shape {shape}")
        return build(num_classes, in_channels=shape[0])
    return builder


MODELS: dict[str, ModelBuilder] = {
    "mlp": lambda shape, classes: MLP(math.prod(shape), classes),
    "small_cnn": lambda shape, classes: SmallCNN(shape[0], classes, image_size=shape[-1]),
    "resnet18_cifar": _image_model(resnet18_cifar),  # 32x32 inputs (CIFAR, shapes)
    "resnet18": _image_model(resnet18),  # 224x224 inputs
    "resnet50": _image_model(resnet50),  # 224x224 inputs
}


def _gpt(size: str) -> ModelBuilder:
    """A GPT decoder of a named size (bench.lm.model): input (T,) token ids, classes = vocabulary."""
    def builder(shape: tuple[int, ...], vocab_size: int) -> nn.Module:
        if len(shape) != 1:
            raise ValueError(f"{size} needs token inputs (context_length,), got shape {shape}")
        return build_gpt(size, vocab_size, shape[0])
    return builder


# Language models (workload lm): the names of bench.lm.model.SIZES
MODELS.update({size: _gpt(size) for size in GPT_SIZES})


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`input_shape` excludes the batch dimension, e.g. (2,) for blobs or (3, 32, 32)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
    return MODELS[name](tuple(input_shape), num_classes)
