"""Model registry: output shapes, published parameter counts, initialisation."""

from __future__ import annotations

import pytest
import torch

from bench.models import MODELS, build_model
from bench.resnet import BasicBlock, Bottleneck


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, shape, classes, params", [
    # the counts torchvision reports for the same layer shapes (He et al. 2016)
    ("resnet50", (3, 224, 224), 1000, 25_557_032),  # "25.6M"
    ("resnet18", (3, 224, 224), 1000, 11_689_512),
    ("resnet18_cifar", (3, 32, 32), 10, 11_173_962),  # "11.2M"
])
def test_resnet_parameter_counts(name, shape, classes, params):
    assert _num_params(build_model(name, shape, classes)) == params


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


def test_residual_blocks_start_as_identity():
    model = build_model("resnet18_cifar", (3, 32, 32), 10)
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == 8 and all(torch.count_nonzero(b.last_bn.weight) == 0 for b in blocks)


def test_unknown_model_and_wrong_input_form():
    with pytest.raises(KeyError, match="known: "):
        build_model("vgg", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("resnet50", (2,), 3)
    assert {"mlp", "small_cnn", "resnet18_cifar", "resnet18", "resnet50"} <= set(MODELS)
