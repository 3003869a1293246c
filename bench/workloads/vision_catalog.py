"""Registry entries for the image workloads: cifar10, cifar100, imagenet, shapes, synthetic.

Owns: their option models (checked when the sweep is validated: a dataset folder
that does not exist is refused there, naming the path), their sizes, the models
each may use, the on-disk layouts (CIFAR file names, download URLs and MD5s), and
``ENTRIES``, which ``bench.workloads`` registers.

Must not import: torch, torchvision, ray, pandas (config validation runs without
them), nor ``bench.workloads`` itself (only its ``registry``). The loaders live in
``bench.workloads.vision`` (CIFAR, synthetic), ``.imagenet`` and ``.shapes`` and are
imported lazily; so is the ImageFolder scan (torchvision's) that sizes ImageNet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bench.errors import UserError
from bench.workloads.registry import WorkloadInfo

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

def _class_folders(split_dir: Path) -> set[str]:
    # Only to compare train/ with val/ at validation time; the scan itself (which folders are
    # classes, their order, the images) is torchvision's, in bench.workloads.imagenet.
    return {e.name for e in os.scandir(split_dir) if e.is_dir()}


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
    decoder: Literal["torchvision", "pil"] = Field(
        "torchvision", description="torchvision.io (libjpeg-turbo; other formats through Pillow) or Pillow")
    decode_on: Literal["auto", "loader", "device"] = Field(
        "auto", description="loader: DataLoader processes decode and crop; device: they only read the "
        "files, the training process decodes each batch on its device (nvjpeg on CUDA) and crops "
        "there; auto: device on CUDA, loader otherwise")

    @model_validator(mode="after")
    def _folders_exist(self) -> "ImageNetOptions":
        root = Path(self.root).expanduser()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise ValueError(f"root: {root / split} is not a folder (expected ImageFolder layout "
                                 f"root/train/<class>/ and root/val/<class>/)")
        train, val = _class_folders(root / "train"), _class_folders(root / "val")
        if not train or train != val:
            raise ValueError(f"root: {root}: train/ and val/ must hold the same class folders "
                             f"({len(train)} in train, {len(val)} in val)")
        if self.decoder == "pil" and self.decode_on == "device":
            raise ValueError("decode_on: device decodes with torchvision (nvjpeg on CUDA); the Pillow "
                             "decoder runs in the loader processes (decode_on: loader or auto)")
        return self


def _imagenet_sizes(opts: ImageNetOptions) -> tuple[int, int]:
    """One scan per split (ImageNet: ~1.33M entries, seconds on a local disk), cached per process
    and shared with the loader, so the plan counts exactly the images the workers read."""
    from bench.workloads.imagenet import scan_split  # torchvision: paid by imagenet sweeps only

    root = Path(opts.root).expanduser().resolve()
    try:
        return len(scan_split(str(root / "train")).labels), len(scan_split(str(root / "val")).labels)
    except FileNotFoundError as err:  # torchvision: a class folder without a single image
        raise UserError(f"workload_options.root: {root}: {err}") from None


# --- generated -------------------------------------------------------------------------------

class ShapesOptions(BaseModel):
    """Generated 32x32 RGB shapes and textures; the same options give the same images on
    every machine, and a smaller num_train is a prefix of a larger one. ``distractors``,
    ``occluders`` and ``label_noise`` make the harder variant (``bench.workloads.shapes``);
    at 0 the images are the original set's."""

    model_config = ConfigDict(extra="forbid")
    num_train: int = Field(50_000, ge=1, le=2_000_000)
    num_test: int = Field(10_000, ge=1, le=1_000_000)
    data_seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the generator (not the run seed)")
    noise: float = Field(0.15, ge=0.0, le=1.0, description="std of per-pixel noise, on the 0..1 pixel scale")
    distractors: int = Field(0, ge=0, le=8, description="small objects of random classes behind the target")
    occluders: int = Field(0, ge=0, le=4, description="random bars drawn across the target")
    label_noise: float = Field(0.0, ge=0.0, lt=0.9, description="share of training labels replaced by "
                               "another class (the test labels stay clean)")


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
_VISION = "bench.workloads.vision"

ENTRIES: tuple[WorkloadInfo, ...] = (
    WorkloadInfo(
        name="cifar10", description="CIFAR-10 from a local torchvision-format folder; crop+flip augmentation",
        options=CifarOptions, default_model="resnet18_cifar", models=_CIFAR_MODELS, num_classes=10,
        sizes=lambda o: (o.num_train, o.num_test), loader=f"{_VISION}:load_cifar10"),
    WorkloadInfo(
        name="cifar100", description="CIFAR-100 (fine labels) from a local torchvision-format folder",
        options=Cifar100Options, default_model="resnet18_cifar", models=_CIFAR_MODELS, num_classes=100,
        sizes=lambda o: (o.num_train, o.num_test), loader=f"{_VISION}:load_cifar100"),
    WorkloadInfo(
        name="imagenet", description="ImageNet (ImageFolder layout), streamed from disk; 224x224 crops",
        options=ImageNetOptions, default_model="resnet50", models=("resnet50", "resnet18"), num_classes=1000,
        sizes=_imagenet_sizes, loader="bench.workloads.imagenet:load_imagenet"),
    WorkloadInfo(
        name="shapes", description="generated 32x32 shapes and textures, 10 classes, deterministic, offline",
        options=ShapesOptions, default_model="small_cnn", models=("small_cnn", "resnet18_cifar", "mlp"),
        num_classes=10, sizes=lambda o: (o.num_train, o.num_test), loader="bench.workloads.shapes:load_shapes"),
    WorkloadInfo(
        name="synthetic", description="random tensors for throughput-only runs (no accuracy)",
        options=SyntheticOptions, default_model=synthetic_default_model(),
        models=("resnet18_cifar", "resnet18", "resnet50", "small_cnn"), num_classes=10,
        sizes=lambda o: (o.num_train, o.num_test), loader=f"{_VISION}:load_synthetic", has_accuracy=False,
        seeded=True),
)
