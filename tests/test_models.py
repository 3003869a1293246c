"""Model registry: output shapes, published parameter counts, the CIFAR stem, zero-init residuals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from bench.models import MODELS, build_model


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, shape, classes, params", [
    # He et al. 2016 as torchvision builds them (its model cards: 11.7M, 25.6M)
    ("resnet50", (3, 224, 224), 1000, 25_557_032),
    ("resnet18", (3, 224, 224), 1000, 11_689_512),
    # the CIFAR form at 10 classes: ResNet-18 less the 7x7 stem (9,408) plus a 3x3 one (1,728), and a
    # 10-way head instead of the 1000-way one (512 x 990 + 990 fewer): 11,689,512 - 7,680 - 507,870
    ("resnet18_cifar", (3, 32, 32), 10, 11_173_962),
])
def test_resnet_parameter_counts(name, shape, classes, params):
    assert _num_params(build_model(name, shape, classes)) == params


def test_cifar_stem_is_3x3_stride_1_without_max_pool():
    model = build_model("resnet18_cifar", (3, 32, 32), 10)
    assert (model.conv1.kernel_size, model.conv1.stride, model.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert model.conv1.weight.std() > 0  # initialised, not left at zero
    imagenet = build_model("resnet18", (3, 224, 224), 10)
    assert (imagenet.conv1.kernel_size, imagenet.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    # 32x32 in, 4x4 before the pool: the CIFAR form keeps the resolution the ImageNet stem divides by 4
    features = nn.Sequential(*list(model.children())[:-2])
    assert features(torch.zeros(1, 3, 32, 32)).shape == (1, 512, 4, 4)


def test_other_channel_counts_get_their_own_first_conv():
    assert build_model("resnet18_cifar", (1, 32, 32), 10).conv1.in_channels == 1
    model = build_model("resnet50", (4, 64, 64), 10).eval()
    assert (model.conv1.in_channels, model.conv1.kernel_size, model.conv1.stride) == (4, (7, 7), (2, 2))


@pytest.mark.parametrize("name, shape", [
    ("mlp", (2,)), ("mlp", (1, 8, 8)), ("small_cnn", (1, 8, 8)), ("small_cnn", (3, 32, 32)),
    ("resnet18_cifar", (3, 32, 32)), ("resnet50", (3, 64, 64)), ("resnet18", (3, 64, 64)),
])
def test_output_shapes(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7).eval()
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_mlp_and_small_cnn_unchanged():
    torch.manual_seed(0)
    mlp = build_model("mlp", (2,), 3)
    assert _num_params(mlp) == 2 * 50 + 50 + 50 * 3 + 3
    assert torch.count_nonzero(mlp.hidden.bias) == 0 and mlp.hidden.weight.abs().max() <= (6 / 2) ** 0.5
    cnn = build_model("small_cnn", (3, 32, 32), 10)
    assert len([m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]) == 3


@pytest.mark.parametrize("name, shape, num_blocks, last_bn", [
    ("resnet18_cifar", (3, 32, 32), 8, "bn2"), ("resnet50", (3, 224, 224), 16, "bn3")])
def test_residual_blocks_start_as_identity(name, shape, num_blocks, last_bn):
    """zero_init_residual (Goyal et al. 2017, 5.1): the last BN of each block has gamma 0, the
    others 1, so at initialisation every block passes its shortcut through unchanged."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    model = build_model(name, shape, 10)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == num_blocks
    for block in blocks:
        assert torch.count_nonzero(getattr(block, last_bn).weight) == 0
        assert torch.all(block.bn1.weight == 1)
    if last_bn == "bn2":  # the first BasicBlock (64 -> 64, stride 1) has the identity shortcut
        x = torch.randn(2, 64, 8, 8)
        with torch.no_grad():
            assert torch.equal(blocks[0].eval()(x), torch.relu(x))


def test_unknown_model_and_wrong_input_form():
    with pytest.raises(KeyError, match="known: "):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("resnet50", (2,), 3)
    assert {"mlp", "small_cnn", "resnet18_cifar", "resnet18", "resnet50"} <= set(MODELS)


@pytest.mark.slow  # ~4.4 s: a fresh interpreter importing torch
def test_only_the_resnets_import_torchvision():
    """torchvision costs ~2 s to import: validating a sweep, starting the CLI and building the
    small models must not pay it; a ResNet does."""
    code = ("import sys, bench.cli, bench.config, bench.models, bench.workloads; bench.cli.build_parser(); "
            "from bench.config import SweepConfig; "
            "SweepConfig.model_validate({'name': 's', 'workload': 'shapes', 'lr': {'reference_lr': 0.1, "
            "'reference_batch_size': 128}, 'epochs': 1, 'global_batch_sizes': [128], 'target_accuracy': 0.5}); "
            "bench.models.build_model('small_cnn', (3, 32, 32), 10); "
            "assert 'torchvision' not in sys.modules; "
            "bench.models.build_model('resnet18_cifar', (3, 32, 32), 10); "
            "assert 'torchvision' in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
