"""The generated shapes set: pinned bytes, prefix stability, and what the harder options add."""

from __future__ import annotations

import hashlib

import pytest
import torch
from pydantic import ValidationError

from bench.workloads import shapes
from bench.workloads import vision_catalog as cat
from bench.workloads.shapes import Difficulty, generate_shapes

HARD = Difficulty(noise=0.2, distractors=3, occluders=1, label_noise=0.1)


def _digest(x: torch.Tensor, y: torch.Tensor) -> str:
    return hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()


def test_shapes_is_pinned_deterministic_and_prefix_stable():
    x, y = generate_shapes(64, 0, "train")
    # Pinned: the same options must give the same bytes on every machine and torch version.
    assert _digest(x, y) == "b2b7107b1130529e4001b6ffd8b78b60b678f181e4e8c5849e4360ea58783420"
    x_big, y_big = generate_shapes(1100, 0, "train")
    assert torch.equal(x_big[:64], x) and torch.equal(y_big[:64], y)
    assert y_big[:1024].bincount().tolist() == [103] * 4 + [102] * 6  # balanced per chunk
    assert not torch.equal(generate_shapes(64, 0, "test")[0], x)
    assert not torch.equal(generate_shapes(64, 1, "train")[0], x)


def test_the_harder_variant_is_pinned_and_prefix_stable():
    x, y = generate_shapes(48, 0, "train", HARD)
    assert _digest(x, y) == "161f4e5db1d105c844e1ddd833f8a8780e284e6ddfa42e4ee979490adab2f137"
    x_big, y_big = generate_shapes(1030, 0, "train", HARD)  # two chunks
    assert torch.equal(x_big[:48], x) and torch.equal(y_big[:48], y)
    xt, yt = generate_shapes(48, 0, "test", HARD)
    assert _digest(xt, yt) == "4d150c41571e9d2568fc60a262b51ec8d1430c14e89fd7a6875201617ff0480e"


def test_each_option_changes_only_what_it_says():
    base_x, base_y = generate_shapes(1024, 0, "train")
    for d in (Difficulty(distractors=2), Difficulty(occluders=1)):
        x, y = generate_shapes(1024, 0, "train", d)
        changed = (x != base_x).flatten(1).any(1).float().mean().item()
        assert torch.equal(y, base_y) and changed > 0.95, d  # labels kept, nearly every image drawn on
    x, y = generate_shapes(1024, 0, "train", Difficulty(label_noise=0.2))
    assert torch.equal(x, base_x)  # label noise changes labels only...
    flipped = (y != base_y).float().mean().item()
    assert 0.15 < flipped < 0.25  # ...about 20 % of them, each to another class
    x, y = generate_shapes(1024, 0, "test", Difficulty(label_noise=0.2))
    assert torch.equal(y, generate_shapes(1024, 0, "test")[1])  # the test labels stay clean


def test_loader_and_options():
    data = shapes.load_shapes(cat.ShapesOptions(num_train=50, num_test=20, distractors=2, occluders=1))
    assert data.x_train.shape == (50, 3, 32, 32) and data.num_test == 20 and data.num_classes == 10
    assert -2 < data.x_train.mean().item() < 2 and data.augment == "none"
    with pytest.raises(ValidationError):
        cat.ShapesOptions(distractors=9)
    with pytest.raises(ValidationError):
        cat.ShapesOptions(label_noise=0.95)
