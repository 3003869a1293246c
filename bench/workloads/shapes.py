"""The generated ``shapes`` set: 32x32 RGB shapes and textures, the same bytes on every machine.

Owns: the generator (``generate_shapes``) and the loader (``load_shapes``). Ten classes
(``SHAPES_CLASSES``): five outlines (circle, square, triangle, cross, ring) and five textures
(horizontal, vertical and diagonal stripes, checker, dots), each drawn once per image with a
random colour, position, size and rotation over a random gradient background, plus pixel noise.

The harder variant (the ``distractors``, ``occluders`` and ``label_noise`` options) adds, per
image, small objects of random classes behind the target (the label is the largest object),
random bars across the target, and a share of training labels replaced by another class. Those
draws come from a second generator per chunk, so with the options at 0 the images are the
original set's, byte for byte.

Bit-identical on every machine: only ``torch.rand``/``randperm`` on CPU generators, and
elementwise +, -, *, /, sqrt, floor and comparisons (IEEE-exact; no transcendental functions,
no float reductions, no fused ops). Each chunk of 1024 images has its own generators, seeded by
(data_seed, split, chunk), so ``num_images`` only truncates: a smaller set is a prefix of a
larger one.

Must not import: ray, pandas, torchvision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bench.workloads.data import Data, normalise

SHAPES_CLASSES = ("circle", "square", "triangle", "cross", "ring",
                  "horizontal_stripes", "vertical_stripes", "checker", "diagonal_stripes", "dots")
NUM_CLASSES = len(SHAPES_CLASSES)
SHAPES_MEAN, SHAPES_STD = 0.5, 0.3  # fixed, not measured: reductions could differ across machines
CHUNK = 1024  # images per generator stream; fixed, so a smaller set is a prefix of a larger
SIZE = 32  # pixels, height = width
_HARD_STREAM = 7_919  # offsets the seeds of the second (harder-variant) generator of a chunk


@dataclass(frozen=True)
class Difficulty:
    """What the harder variant adds per image (all 0: the original set)."""

    noise: float = 0.15  # std of uniform per-pixel noise, on the 0..1 pixel scale
    distractors: int = 0  # small objects of random classes drawn behind the target
    occluders: int = 0  # bars drawn across the target, on top of it
    label_noise: float = 0.0  # share of *training* labels replaced by another class (test stays clean)


def generate_shapes(num_images: int, data_seed: int, split: str,
                    difficulty: Difficulty = Difficulty()) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, 32, 32), int64 labels); classes balanced per chunk of 1024 (before label
    noise). ``split`` is "train" or "test"; label noise applies to "train" only."""
    split_id = {"train": 0, "test": 1}[split]
    images, labels = [], []
    for chunk in range(math.ceil(num_images / CHUNK)):
        seed = (data_seed * 2 + split_id) * 1_000_003 + chunk
        g = torch.Generator().manual_seed(seed)
        hard = torch.Generator().manual_seed(seed + _HARD_STREAM * 1_000_003 ** 2)
        x, y = _chunk(g, hard, difficulty, noisy_labels=split == "train")
        images.append(x)
        labels.append(y)
    return torch.cat(images)[:num_images], torch.cat(labels)[:num_images]


def _uniform(g: torch.Generator):
    return lambda *shape: torch.rand(shape, generator=g)


def _colour_apart(u, bg: torch.Tensor, k: int) -> torch.Tensor:
    """A colour whose every channel differs from ``bg`` by 0.3..0.7 (wrapped into 0..1)."""
    fg = bg + 0.3 + 0.4 * u(k, 3, 1, 1)
    return torch.where(fg >= 1, fg - 1, fg)


def _rotation(u, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of a random angle without calling cos/sin: a normalised random vector."""
    a, b = 2 * u(k, 1, 1) - 1, 2 * u(k, 1, 1) - 1
    norm = (a * a + b * b).sqrt().clamp_min(1e-3)
    return a / norm, b / norm


def _chunk(g: torch.Generator, hard: torch.Generator, d: Difficulty, noisy_labels: bool,
           k: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    u = _uniform(g)  # every draw, for every image, in a fixed order: the original set
    labels = (torch.arange(k) % NUM_CLASSES)[torch.randperm(k, generator=g)]
    cx, cy, radius = (8 + 16 * u(k, 1, 1), 8 + 16 * u(k, 1, 1), 5 + 6 * u(k, 1, 1))  # pixels
    cos, sin = _rotation(u, k)
    period, phase, diag = 3 + 3 * u(k, 1, 1), 6 * u(k, 1, 1), torch.where(u(k, 1, 1) < 0.5, 1.0, -1.0)
    bg = u(k, 3, 1, 1)
    fg = _colour_apart(u, bg, k)
    slope = (u(k, 3, 1, 1) - 0.5) * 0.5, 2 * u(k, 1, 1, 1) - 1, 2 * u(k, 1, 1, 1) - 1
    pixel_noise = (u(k, 3, SIZE, SIZE) - 0.5) * (d.noise * 12 ** 0.5)  # uniform, std = noise

    xs = torch.arange(SIZE, dtype=torch.float32).view(1, 1, SIZE) + 0.5
    ys = xs.view(1, SIZE, 1)
    x = bg + slope[0] * (slope[1] * (xs - 16) + slope[2] * (ys - 16)) / 16  # the background gradient
    x = x.expand(k, 3, SIZE, SIZE)

    h = _uniform(hard)
    for _ in range(d.distractors):  # behind the target, smaller than any target (radius 2..4.5 < 5)
        kind = torch.floor(NUM_CLASSES * h(k)).clamp_max(NUM_CLASSES - 1).long()
        dcos, dsin = _rotation(h, k)
        mask = _class_mask(kind, 2 + 30 * h(k, 1, 1), 2 + 30 * h(k, 1, 1), 2 + 2.5 * h(k, 1, 1), dcos, dsin,
                           3 + 3 * h(k, 1, 1), 6 * h(k, 1, 1), torch.where(h(k, 1, 1) < 0.5, 1.0, -1.0), xs, ys)
        x = torch.where(mask.unsqueeze(1), _colour_apart(h, bg, k), x)

    x = torch.where(_class_mask(labels, cx, cy, radius, cos, sin, period, phase, diag, xs, ys).unsqueeze(1), fg, x)

    for _ in range(d.occluders):  # a bar through a point near the target's centre, on top of it
        bcos, bsin = _rotation(h, k)
        bx, by = cx + radius * (2 * h(k, 1, 1) - 1), cy + radius * (2 * h(k, 1, 1) - 1)
        half_length, half_width = 6 + 10 * h(k, 1, 1), 1 + 1.5 * h(k, 1, 1)
        along = bcos * (xs - bx) + bsin * (ys - by)
        across = bcos * (ys - by) - bsin * (xs - bx)
        bar = (along.abs() <= half_length) & (across.abs() <= half_width)
        x = torch.where(bar.unsqueeze(1), h(k, 3, 1, 1), x)

    images = ((x + pixel_noise).clamp(0, 1) * 255).round().to(torch.uint8)
    if noisy_labels and d.label_noise > 0:  # another class, uniformly: never the true one
        flip = h(k) < d.label_noise
        other = (labels + 1 + torch.floor((NUM_CLASSES - 1) * h(k)).clamp_max(NUM_CLASSES - 2).long()) % NUM_CLASSES
        labels = torch.where(flip, other, labels)
    return images, labels


def _class_mask(kind, cx, cy, radius, cos, sin, period, phase, diag, xs, ys) -> torch.Tensor:
    """(k, 32, 32) bool: the pixels of object ``kind[i]`` (a class index) in image i."""
    dx, dy = xs - cx, ys - cy
    pu, pv = (cos * dx + sin * dy) / radius, (cos * dy - sin * dx) / radius  # rotated, unit size
    masks = _shape_masks(pu, pv) + _texture_masks(xs, ys, pu, pv, period, phase, diag)
    out = torch.zeros(kind.shape[0], SIZE, SIZE, dtype=torch.bool)
    for c, m in enumerate(masks):
        out |= m & (kind == c).view(-1, 1, 1)
    return out


def _shape_masks(pu: torch.Tensor, pv: torch.Tensor) -> list[torch.Tensor]:
    r2, au, av = pu * pu + pv * pv, pu.abs(), pv.abs()
    return [r2 <= 1,  # circle
            torch.maximum(au, av) <= 0.8,  # square
            (pv <= 0.5) & (pv >= 1.732 * au - 1),  # triangle (equilateral, apex up before rotation)
            ((au <= 0.3) & (av <= 1)) | ((av <= 0.3) & (au <= 1)),  # cross
            (r2 <= 1) & (r2 >= 0.45)]  # ring


def _texture_masks(xs, ys, pu, pv, period, phase, diag) -> list[torch.Tensor]:
    """Patterns in image axes (so horizontal stays horizontal) inside a rotated square patch."""
    frac = lambda t: t - torch.floor(t)  # noqa: E731
    patch = torch.maximum(pu.abs(), pv.abs()) <= 1.3
    rows, cols = frac((ys + phase) / period) < 0.5, frac((xs + phase) / period) < 0.5
    diagonal = frac((xs + diag * ys + phase) / (period * 1.4)) < 0.5
    fx, fy = frac((xs + phase) / (period + 1.5)) - 0.5, frac((ys + phase) / (period + 1.5)) - 0.5
    dots = fx * fx + fy * fy < 0.09
    return [patch & m for m in (rows, cols, rows ^ cols, diagonal, dots)]


def load_shapes(options, _seed: int = 0) -> Data:
    """The set described by ``options`` (``bench.workloads.vision_catalog.ShapesOptions``); the data
    depend only on the options (``data_seed``), never on the run seed."""
    d = Difficulty(options.noise, options.distractors, options.occluders, options.label_noise)
    x_tr, y_tr = generate_shapes(options.num_train, options.data_seed, "train", d)
    x_te, y_te = generate_shapes(options.num_test, options.data_seed, "test", d)
    mean, std = (SHAPES_MEAN,) * 3, (SHAPES_STD,) * 3
    return Data(normalise(x_tr, mean, std), y_tr, normalise(x_te, mean, std), y_te, num_classes=NUM_CLASSES,
                augment="none")
