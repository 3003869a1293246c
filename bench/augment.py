"""Image augmentation: batched on the device for in-memory data, per image for streamed data.

Owns:
- ``random_crop_flip`` — the CIFAR-style augmentation (random crop from a padded
  image + horizontal flip) that ``Data.augment == "crop_flip"`` asks the worker
  to apply to every training batch. It runs as a handful of tensor ops (one
  gather for the whole batch), never a Python loop over images, so on a GPU it
  costs a few kernel launches per step instead of a CPU round trip.
- ``imagenet_train_transform`` / ``imagenet_val_transform`` — the standard ImageNet
  transforms of one uint8 image (random resized crop 224 + flip; resize 256 + centre crop
  224), torchvision's ``transforms.v2``, run by the streamed ImageNet dataset in DataLoader
  processes, or per image on the device after a batched decode. torchvision has nothing like
  the batched crop-and-flip above, so that one is ours.

Must not import: ray, pandas; torchvision only inside the functions that build its transforms
(importing it costs ~2 s, which resident-data runs must not pay).
"""

from __future__ import annotations

from typing import Literal

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


# --- per-image transforms (streamed ImageNet): torchvision.transforms.v2 -----------------------

def imagenet_train_transform(size: int = 224):
    """Random resized crop to ``size`` (8-100 % of the area, aspect ratio 3/4..4/3, bilinear with
    antialiasing) and a horizontal flip with p = 1/2, on a uint8 (C, H, W) tensor on any device.
    The random draws come from torch's default CPU generator, which DataLoader seeds per loader
    process (and the batch decoder per batch): reproducible for a seeded loader."""
    from torchvision.transforms import v2

    return v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()])


def imagenet_val_transform(size: int = 224, resize: int = 256):
    """Shorter side to ``resize`` (bilinear, antialiased), centre crop ``size``; deterministic."""
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
