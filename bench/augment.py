"""Image augmentation: batched on the device for in-memory data, per image for streamed data.

Owns:
- ``random_crop_flip`` — the CIFAR-style augmentation (random crop from a padded
  image + horizontal flip) that ``Data.augment == "crop_flip"`` asks the worker
  to apply to every training batch. It runs as a handful of tensor ops (one
  gather for the whole batch), never a Python loop over images, so on a GPU it
  costs a few kernel launches per step instead of a CPU round trip.
- ``train_transform`` / ``val_transform`` — the standard ImageNet transforms on
  one Pillow image (random resized crop 224 + flip; resize 256 + centre crop
  224), run inside DataLoader processes by the streamed ImageNet dataset.

Must not import: ray, pandas, torchvision; Pillow only inside the Pillow transforms.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

PadMode = Literal["reflect", "zeros"]


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Mirror out-of-range indices without repeating the edge (torch's 'reflect' padding):
    -1 -> 1, size -> size - 2. Valid for indices in [-(size - 1), 2 * size - 2]."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None,
                     pad_mode: PadMode = "reflect", flip: bool = True) -> torch.Tensor:
    """Random ``H x W`` crop of each image padded by ``padding`` pixels per side, then a
    horizontal flip with probability 1/2; returns a new (N, C, H, W) tensor on x's device.

    ``pad_mode`` "reflect" mirrors the border (airbench's choice); "zeros" pads with 0, which
    for normalised data is the dataset mean colour. The random offsets and flips are drawn
    from ``generator`` (on its own device; the few numbers are then moved to x's device),
    or from the default generator of x's device when it is None. Same generator state, same
    output. The padded image is never materialised: source indices are computed per pixel.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if padding < 0 or (pad_mode == "reflect" and padding >= min(h, w)):
        raise ValueError(f"padding {padding} must be in 0..{min(h, w) - 1} for {h}x{w} images")
    draw_device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=draw_device)
    flips = torch.randint(0, 2, (n,), generator=generator, device=draw_device).bool() & flip
    offsets, flips = offsets.to(x.device), flips.to(x.device)

    rows = offsets[0, :, None] - padding + torch.arange(h, device=x.device)  # (N, H) in padded coords
    cols_step = torch.arange(w, device=x.device)
    cols_step = torch.where(flips[:, None], (w - 1) - cols_step, cols_step)  # read mirrored columns
    cols = offsets[1, :, None] - padding + cols_step  # (N, W)

    if pad_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
        inside = None
    elif pad_mode == "zeros":
        inside = (((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :])
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    else:
        raise ValueError(f"pad_mode {pad_mode!r} (allowed: reflect, zeros)")

    # One gather: flat index (row * W + col) per output pixel, shared by all channels.
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(x.reshape(n, c, h * w), 2, flat).reshape(n, c, h, w)
    if inside is not None:
        out = out * inside[:, None].to(out.dtype)
    return out


# --- per-image Pillow transforms (streamed ImageNet) -------------------------------------------

def _uniform(low: float, high: float) -> float:
    # torch's RNG, which DataLoader seeds per loader process: reproducible for a seeded loader.
    return low + (high - low) * torch.rand(()).item()


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(left, top, crop_width, crop_height) covering a random 8-100 % of the area with a
    log-uniform aspect ratio in [3/4, 4/3] (Szegedy et al.'s Inception crop); after 10 misses,
    the centred largest crop whose aspect ratio is within range."""
    area = width * height
    for _ in range(10):
        target = area * _uniform(*scale)
        aspect = math.exp(_uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, ()).item())
            top = int(torch.randint(0, height - h + 1, ()).item())
            return left, top, w, h
    w, h = width, height
    if width / height < ratio[0]:
        h = round(width / ratio[0])
    elif width / height > ratio[1]:
        w = round(height * ratio[1])
    return (width - w) // 2, (height - h) // 2, w, h


def _pil_to_uint8(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def train_transform(img, size: int = 224) -> torch.Tensor:
    """Random resized crop to size x size (bilinear), horizontal flip with p = 1/2; uint8 CHW."""
    from PIL import Image

    left, top, w, h = random_resized_crop_box(*img.size)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    if torch.rand(()).item() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _pil_to_uint8(img)


def val_transform(img, size: int = 224, resize: int = 256) -> torch.Tensor:
    """Shorter side to ``resize`` (bilinear), centre crop size x size; uint8 CHW."""
    from PIL import Image

    width, height = img.size
    scale = resize / min(width, height)
    new_w, new_h = max(resize, round(width * scale)), max(resize, round(height * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return _pil_to_uint8(img.crop((left, top, left + size, top + size)))
