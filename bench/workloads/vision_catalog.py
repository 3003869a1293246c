"""Registry entries for the image workloads: cifar10, cifar100, imagenet, shapes, synthetic.

Owns: their option models (checked when the sweep is validated: a dataset folder
that does not exist is refused there, naming the path), their sizes, the models
each may use, the on-disk layouts (CIFAR file names, download URLs and MD5s; the
ImageFolder scan shared by the sizes function and the imagenet loader).

Must not import: torch, ray, pandas (config validation runs without them). The
loaders live in ``bench.workloads.vision`` and are imported lazily.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Iterator, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.workloads import WorkloadInfo, register

# --- CIFAR ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarLayout:
    """torchvision's on-disk form of the official python-pickle release."""

    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    url: str
    md5: str  # of the tarball


CIFAR10 = CifarLayout("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                      b"labels", 10, "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                      "c58f30108f718f92721af3b95e74349a")
CIFAR100 = CifarLayout("cifar-100-python", ("train",), ("test",), b"fine_labels", 100,
                       "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                       "eb9058c3a382ffc7106e4002c42a8d85")


class CifarOptions(BaseModel):
    """``root`` is the folder that holds ``cifar-10-batches-py/`` (or ``cifar-100-python/``), as
    torchvision's ``root``. A relative path is taken from the current directory of whichever
    process reads it, so prefer an absolute one. ``download: true`` fetches the official
    tarball into ``root`` when the folder is missing and checks its MD5."""

    model_config = ConfigDict(extra="forbid")
    layout: ClassVar[CifarLayout] = CIFAR10
    root: str = Field(description="folder containing the torchvision-format CIFAR folder")
    download: bool = Field(False, description="fetch the official tarball when missing (needs internet)")
    num_train: int = Field(50_000, ge=1, le=50_000, description="use the first num_train training images")
    num_test: int = Field(10_000, ge=1, le=10_000, description="use the first num_test test images")

    @model_validator(mode="after")
    def _files_exist(self) -> "CifarOptions":
        if not self.download:
            folder = Path(self.root).expanduser() / self.layout.folder
            missing = [f for f in self.layout.train_files + self.layout.test_files if not (folder / f).is_file()]
            if missing:
                raise ValueError(f"root: {folder} lacks {', '.join(missing)} (point root at the folder that "
                                 f"contains {self.layout.folder}/, or set download: true)")
        return self


class Cifar100Options(CifarOptions):
    layout: ClassVar[CifarLayout] = CIFAR100


# --- ImageNet (ImageFolder layout) -----------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def image_folder_classes(split_dir: Path) -> list[str]:
    """Class names = sorted sub-folder names; the label of a class is its index here."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def iter_image_folder(split_dir: Path, classes: list[str]) -> Iterator[tuple[str, int]]:
    """(path, label) for every image file, in sorted order within each class folder."""
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(split_dir / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        for f in files:
            yield str(split_dir / name / f), label


class ImageNetOptions(BaseModel):
    """``root`` holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (val sorted into class
    folders, as torchvision's ImageFolder wants). Images stream from disk; the two loader
    settings size each training worker's DataLoader. Train accuracy and loss are measured on
    ``train_eval_samples`` evenly spaced training images (val transform), not all 1.28M."""

    model_config = ConfigDict(extra="forbid")
    root: str = Field(description="folder with train/ and val/ class folders")
    num_loader_workers: int = Field(8, ge=0, le=128, description="DataLoader processes per training worker")
    prefetch_factor: int = Field(4, ge=1, le=64, description="batches each loader process keeps ready")
    train_eval_samples: int = Field(50_000, ge=1, description="evenly spaced training images the train "
                                    "accuracy/loss are measured on (all of them when the set is smaller)")

    @model_validator(mode="after")
    def _folders_exist(self) -> "ImageNetOptions":
        root = Path(self.root).expanduser()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ValueError(f"root: {root / split} is not a folder (expected ImageFolder layout "
                                 f"root/train/<class>/ and root/val/<class>/)")
        train, val = image_folder_classes(root / "train"), image_folder_classes(root / "val")
        if not train or train != val:
            raise ValueError(f"root: {root}: train/ and val/ must hold the same class folders "
                             f"({len(train)} in train, {len(val)} in val)")
        return self


@lru_cache(maxsize=8)
def _count_images(root: str) -> tuple[int, int]:
    # One directory scan per split (ImageNet: ~1.33M entries, seconds on a local disk), cached.
    counts = []
    for split in ("train", "val"):
        split_dir = Path(root).expanduser() / split
        counts.append(sum(1 for _ in iter_image_folder(split_dir, image_folder_classes(split_dir))))
    return counts[0], counts[1]


def _imagenet_sizes(opts: ImageNetOptions) -> tuple[int, int]:
    return _count_images(str(Path(opts.root).expanduser().resolve()))


# --- generated -------------------------------------------------------------------------------

class ShapesOptions(BaseModel):
    """Generated 32x32 RGB shapes and textures; the same options give the same images on
    every machine, and a smaller num_train is a prefix of a larger one."""

    model_config = ConfigDict(extra="forbid")
    num_train: int = Field(50_000, ge=1, le=2_000_000)
    num_test: int = Field(10_000, ge=1, le=1_000_000)
    data_seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the generator (not the run seed)")
    noise: float = Field(0.15, ge=0.0, le=1.0, description="std of per-pixel noise, on the 0..1 pixel scale")


MAX_SYNTHETIC_GIB = 8.0  # both splits as float32; a bigger set buys nothing for a throughput run


class SyntheticOptions(BaseModel):
    """Random images and labels for throughput-only runs (no accuracy to reach)."""

    model_config = ConfigDict(extra="forbid")
    num_train: int = Field(10_000, ge=1, le=10_000_000)
    num_test: int = Field(1_000, ge=1, le=10_000_000)
    image_size: int = Field(32, ge=8, le=1024, description="height = width, pixels")
    num_classes: int = Field(10, ge=2, le=100_000)

    @model_validator(mode="after")
    def _fits(self) -> "SyntheticOptions":
        gib = (self.num_train + self.num_test) * 3 * self.image_size ** 2 * 4 / 2**30
        if gib > MAX_SYNTHETIC_GIB:
            raise ValueError(f"num_train + num_test = {self.num_train + self.num_test} images of "
                             f"3x{self.image_size}x{self.image_size} float32 take {gib:.1f} GiB per worker; "
                             f"the limit is {MAX_SYNTHETIC_GIB:g} GiB")
        return self


def synthetic_default_model(opts: Optional[SyntheticOptions] = None) -> str:
    """ResNet-50 for ImageNet-sized inputs, the CIFAR ResNet-18 for small ones."""
    return "resnet50" if opts is not None and opts.image_size >= 128 else "resnet18_cifar"


# --- registrations ---------------------------------------------------------------------------

_CIFAR_MODELS = ("resnet18_cifar", "small_cnn")
_LOADERS = "bench.workloads.vision"

register(WorkloadInfo(
    name="cifar10", description="CIFAR-10 from a local torchvision-format folder; crop+flip augmentation",
    options=CifarOptions, default_model="resnet18_cifar", models=_CIFAR_MODELS, num_classes=10,
    sizes=lambda o: (o.num_train, o.num_test), loader=f"{_LOADERS}:load_cifar10"))

register(WorkloadInfo(
    name="cifar100", description="CIFAR-100 (fine labels) from a local torchvision-format folder",
    options=Cifar100Options, default_model="resnet18_cifar", models=_CIFAR_MODELS, num_classes=100,
    sizes=lambda o: (o.num_train, o.num_test), loader=f"{_LOADERS}:load_cifar100"))

register(WorkloadInfo(
    name="imagenet", description="ImageNet (ImageFolder layout), streamed from disk; 224x224 crops",
    options=ImageNetOptions, default_model="resnet50", models=("resnet50", "resnet18"), num_classes=1000,
    sizes=_imagenet_sizes, loader=f"{_LOADERS}:load_imagenet"))

register(WorkloadInfo(
    name="shapes", description="generated 32x32 shapes and textures, 10 classes, deterministic, offline",
    options=ShapesOptions, default_model="small_cnn", models=("small_cnn", "resnet18_cifar", "mlp"),
    num_classes=10, sizes=lambda o: (o.num_train, o.num_test), loader=f"{_LOADERS}:load_shapes"))

register(WorkloadInfo(
    name="synthetic", description="random tensors for throughput-only runs (no accuracy)",
    options=SyntheticOptions, default_model=synthetic_default_model(),
    models=("resnet18_cifar", "resnet18", "resnet50", "small_cnn"), num_classes=10,
    sizes=lambda o: (o.num_train, o.num_test), loader=f"{_LOADERS}:load_synthetic", has_accuracy=False,
    seeded=True))
