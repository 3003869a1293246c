"""ImageNet in ImageFolder layout, streamed from disk, read with torchvision.

Owns: the folder scan (torchvision's ``find_classes``/``make_dataset``: class index = position
of the class folder in sorted order, images in sorted order within each, every file with an
image extension at any depth), decoding one file (``torchvision.io.decode_image``, libjpeg-turbo;
formats it does not read, such as BMP or TIFF, through Pillow; or Pillow for all, the
``decoder: pil`` option), the Dataset of (uint8 CHW image, label) or (encoded file, label)
items, the batched decoder that runs on the training device (``decode_jpeg`` on a list: nvjpeg
on CUDA), and ``load_imagenet``.

Must not import: ray, pandas. Imported only by the imagenet loader and its sizes function,
so only imagenet sweeps pay for importing torchvision.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, read_file

from bench.augment import imagenet_train_transform, imagenet_val_transform
from bench.workloads.streaming import StreamingData

if TYPE_CHECKING:  # the catalog imports this module's scan; at run time only the type is shared
    from bench.workloads.vision_catalog import ImageNetOptions

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
JPEG_MAGIC = b"\xff\xd8\xff"  # every JPEG starts with SOI + a marker; ImageNet has a PNG named .JPEG


@dataclass(frozen=True)
class Scan:
    """One split's images. Paths sit in one NumPy bytes array, not a list of Python strings, so
    forked DataLoader processes do not copy them page by page as they touch the refcounts."""

    classes: tuple[str, ...]
    paths: np.ndarray  # np.bytes_, os.fsencode'd
    labels: np.ndarray  # int64


@lru_cache(maxsize=8)
def scan_split(split_dir: str) -> Scan:
    """torchvision's ImageFolder scan of ``split_dir``, once per process (it is the plan's count
    on the driver and the workers' list of files). Raises FileNotFoundError (torchvision's
    message) when a class folder holds no image."""
    classes, class_to_idx = find_classes(split_dir)
    samples = make_dataset(split_dir, class_to_idx, extensions=IMG_EXTENSIONS)
    return Scan(tuple(classes), np.array([os.fsencode(p) for p, _ in samples], dtype=np.bytes_),
                np.array([label for _, label in samples], dtype=np.int64))


def decode_pil(source) -> torch.Tensor:
    """Pillow's decode of a path or file object, converted to RGB (ImageNet has greyscale and
    CMYK JPEGs): uint8 (3, H, W)."""
    from PIL import Image

    with Image.open(source) as img:
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def decode_bytes(data: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) from a file's bytes (uint8 1-D). torchvision reads JPEG, PNG, WebP and
    GIF (by content, not by name); anything else ImageFolder accepts (BMP, PPM, TIFF) goes
    through Pillow."""
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:  # "Unsupported image file": not a format torchvision.io decodes
        return decode_pil(io.BytesIO(data.numpy().tobytes()))


def decode_file(path: str, decoder: str = "torchvision") -> torch.Tensor:
    return decode_pil(path) if decoder == "pil" else decode_bytes(read_file(path))


class ImageFolderDataset(Dataset):
    """Items are (uint8 CHW image, label) through ``transform``, or with ``encoded`` the file's
    bytes (uint8 1-D) for a ``JpegBatchDecoder`` to decode on the device."""

    def __init__(self, scan: Scan, transform: Callable[[torch.Tensor], torch.Tensor], decoder: str = "torchvision",
                 encoded: bool = False) -> None:
        self.paths, self.labels = scan.paths, scan.labels
        self.transform, self.decoder, self.encoded = transform, decoder, encoded

    def __len__(self) -> int:
        return len(self.labels)

    def evaluation_view(self, count: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> "ImageFolderDataset":
        """``count`` evenly spaced images of this split (every class represented, the same ones at
        every epoch and batch size) read with ``transform`` (the deterministic val transform):
        what the train accuracy and loss are measured on, since scoring all 1.28M images each
        evaluation would cost about as much as a training epoch."""
        picks = np.unique(np.linspace(0, len(self) - 1, num=min(count, len(self))).round().astype(np.int64))
        view = copy.copy(self)
        view.paths, view.labels, view.transform = self.paths[picks], self.labels[picks], transform
        return view

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = os.fsdecode(self.paths[index])
        if self.encoded:
            return read_file(path), int(self.labels[index])
        return self.transform(decode_file(path, self.decoder)), int(self.labels[index])


class JpegBatchDecoder:
    """Decodes a loader batch of encoded files on the training device and applies the train or
    val transform there, image by image (crops differ in size), stacking uint8 (N, 3, S, S).

    JPEGs go to ``decode_jpeg`` as one list (nvjpeg's batched decode on CUDA); other files, and
    a batch the device decoder refuses (nvjpeg lacks some JPEG variants), are decoded one by one
    on the CPU (``decode_file``) and moved. Training crops draw from the CPU generator that
    ``rng`` seeds per batch, so they do not depend on what else used the global one."""

    def __init__(self, train_transform: Callable, val_transform: Callable) -> None:
        self.train_transform, self.val_transform = train_transform, val_transform

    @staticmethod
    def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """((all files' bytes end to end, each file's length), labels): two tensors cross from the
        loader process, not one per file (which runs the loader out of file descriptors)."""
        lengths = torch.tensor([len(data) for data, _ in items], dtype=torch.int64)
        return (torch.cat([data for data, _ in items]), lengths), torch.tensor([y for _, y in items], dtype=torch.int64)

    @staticmethod
    def split(batch: tuple[torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        """The files of a collated batch, as uint8 1-D CPU tensors."""
        flat, lengths = batch
        return list(flat.cpu().split(lengths.tolist()))

    @staticmethod
    def decode(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Each file decoded to uint8 (3, H, W) on ``device``."""
        images: list[torch.Tensor | None] = [None] * len(encoded)
        jpeg = [i for i, data in enumerate(encoded) if bytes(data[:3].tolist()) == JPEG_MAGIC]
        if jpeg:
            try:
                decoded = decode_jpeg([encoded[i].cpu() for i in jpeg], mode=ImageReadMode.RGB, device=device)
                for i, img in zip(jpeg, decoded):
                    images[i] = img
            except RuntimeError:  # one bad or unsupported file fails the batch: fall back per image
                pass
        for i, img in enumerate(images):
            if img is None:
                images[i] = decode_bytes(encoded[i].cpu()).to(device)
        return images  # type: ignore[return-value]

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device, train: bool,
                 rng: torch.Generator) -> torch.Tensor:
        images = self.decode(self.split(batch), device)
        transform = self.train_transform if train else self.val_transform
        seed = int(torch.randint(0, 2**62, (), generator=rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return torch.stack([transform(img) for img in images])


def decodes_on_device(options: ImageNetOptions) -> bool:
    """decode_on "device", or "auto" where this process sees CUDA (a GPU worker; Ray hides the
    GPUs from CPU workers). The Pillow decoder always decodes in the loader processes."""
    if options.decoder == "pil":
        return False
    return options.decode_on == "device" or (options.decode_on == "auto" and torch.cuda.is_available())


def load_imagenet(options: ImageNetOptions, _seed: int = 0) -> StreamingData:
    """ImageNet in ImageFolder layout, streamed: train = random resized crop 224 + flip,
    val = resize 256 + centre crop 224 (also on the ``train_eval_samples`` training images the
    train metrics use). Labels are the sorted class-folder indices (torchvision's ImageFolder).
    Decoding happens in the loader processes, or on the device (``decode_on``)."""
    root = Path(options.root).expanduser().resolve()
    train_scan, val_scan = scan_split(str(root / "train")), scan_split(str(root / "val"))
    if train_scan.classes != val_scan.classes:  # validated already; a folder changed since?
        raise ValueError(f"{root}: train/ and val/ hold different class folders")
    train_tf, val_tf = imagenet_train_transform(), imagenet_val_transform()
    on_device = decodes_on_device(options)
    train = ImageFolderDataset(train_scan, train_tf, options.decoder, encoded=on_device)
    return StreamingData(train, ImageFolderDataset(val_scan, val_tf, options.decoder, encoded=on_device),
                         train.evaluation_view(options.train_eval_samples, val_tf),
                         num_classes=len(train_scan.classes), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         num_loader_workers=options.num_loader_workers, prefetch_factor=options.prefetch_factor,
                         batch_decoder=JpegBatchDecoder(train_tf, val_tf) if on_device else None)
