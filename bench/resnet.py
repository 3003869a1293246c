"""Residual networks (He et al. 2016) in the two forms the benchmark uses.

Owns: BasicBlock, Bottleneck and a ResNet trunk with two stems —
``imagenet`` (7x7 stride-2 conv + 3x3 max-pool, for 224x224 inputs) and
``cifar`` (3x3 stride-1 conv, no pool, for 32x32 inputs) — plus the named
builders ``resnet18_cifar``, ``resnet18`` and ``resnet50``.

Written here rather than taken from torchvision so the package has no
torchvision dependency; layer shapes match torchvision's, so parameter counts
do too (ResNet-50 at 1000 classes: 25,557,032; ResNet-18 CIFAR form at 10
classes: 11,173,962). Downsampling sits on the 3x3 conv of a Bottleneck
("ResNet v1.5", as in torchvision and MLPerf).

``zero_init_residual`` sets the last BatchNorm gamma of every residual block to
zero, so each block starts as the identity (Goyal et al. 2017, section 5.1):
it makes large-batch training with warmup more stable.

Must not import: ray, pandas, torchvision.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out)]


class _Residual(nn.Module):
    """relu(body(x) + shortcut(x)); subclasses build ``body`` ending in a BatchNorm."""

    body: nn.Sequential
    shortcut: nn.Module

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.body[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class BasicBlock(_Residual):
    """Two 3x3 convs; the ResNet-18/34 block."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(*_conv_bn(c_in, width, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(width, c_out, 3))
        self.shortcut = _shortcut(c_in, c_out, stride)


class Bottleneck(_Residual):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand x4; the ResNet-50 block."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(*_conv_bn(c_in, width, 1), nn.ReLU(inplace=True),
                                  *_conv_bn(width, width, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(width, c_out, 1))
        self.shortcut = _shortcut(c_in, c_out, stride)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    """Identity when shapes match, else a strided 1x1 projection (He et al.'s option B)."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))


class ResNet(nn.Module):
    """Stem -> four stages (widths 64, 128, 256, 512; stride 2 from stage 2 on) -> global
    average pool -> linear head."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], blocks_per_stage: tuple[int, ...],
                 num_classes: int, in_channels: int = 3, stem: Literal["imagenet", "cifar"] = "imagenet",
                 zero_init_residual: bool = True) -> None:
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(*_conv_bn(in_channels, 64, 7, 2), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(*_conv_bn(in_channels, 64, 3), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c_in = 64
        for i, num_blocks in enumerate(blocks_per_stage):
            width = 64 * 2 ** i
            for j in range(num_blocks):
                stages.append(block(c_in, width, stride=2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, _Residual):
                    nn.init.zeros_(m.last_bn.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def resnet18_cifar(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32x32 inputs: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2]."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, stem="cifar")


def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-18, ImageNet form (a lighter model for the imagenet workload)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, stem="imagenet")


def resnet50(num_classes: int, in_channels: int = 3) -> ResNet:
    """ResNet-50 v1.5, ImageNet form: Bottleneck blocks [3, 4, 6, 3]."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, stem="imagenet")
