"""Image workload loaders: CIFAR-10/100 (local pickles), ImageNet (streamed), shapes, synthetic.

Owns: reading and decoding image data into ``Data`` (fits in memory) or
``StreamingData`` (ImageNet: a Dataset pair read by DataLoader processes, with
the samplers that shard it per step), the shapes generator, and the CIFAR
download. Option models, sizes and on-disk layouts live in ``vision_catalog``
(torch-free); the Pillow transforms in ``bench.augment``.

Must not import: ray, pandas, torchvision. Pickle is only ever read from the
user's own CIFAR folder, and through an unpickler that accepts nothing but
NumPy arrays, lists and bytes.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from bench.augment import train_transform, val_transform
from bench.workloads.data import Data, epoch_permutation
from bench.workloads.vision_catalog import (CifarLayout, CifarOptions, ImageNetOptions, ShapesOptions,
                                            SyntheticOptions, image_folder_classes, iter_image_folder)

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalise(images_u8: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (x / 255 - mean) / std per channel."""
    x = images_u8.float().div_(255.0)
    return x.sub_(torch.tensor(mean).view(1, -1, 1, 1)).div_(torch.tensor(std).view(1, -1, 1, 1))


# --- CIFAR -----------------------------------------------------------------------------------

class _ArrayUnpickler(pickle.Unpickler):
    """The CIFAR batches hold dicts of bytes, lists and one NumPy array; refuse any other global."""

    _ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.numeric", "_frombuffer"),
                ("numpy.core.numeric", "_frombuffer"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}; only NumPy arrays are allowed")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _read_cifar_files(folder: Path, names: tuple[str, ...], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _take(images: np.ndarray, labels: np.ndarray, count: int, what: str, folder: Path) -> tuple:
    if len(labels) < count:
        raise ValueError(f"{folder} holds {len(labels)} {what} images; the options ask for {count}")
    return torch.from_numpy(images[:count].copy()), torch.from_numpy(labels[:count].copy())


def load_cifar(options: CifarOptions, mean: tuple[float, ...], std: tuple[float, ...]) -> Data:
    layout = options.layout
    root = Path(options.root).expanduser()
    ensure_cifar(layout, root, options.download)
    folder = root / layout.folder
    x_tr, y_tr = _take(*_read_cifar_files(folder, layout.train_files, layout.label_key),
                       options.num_train, "training", folder)
    x_te, y_te = _take(*_read_cifar_files(folder, layout.test_files, layout.label_key),
                       options.num_test, "test", folder)
    return Data(_normalise(x_tr, mean, std), y_tr, _normalise(x_te, mean, std), y_te,
                num_classes=layout.num_classes, augment="crop_flip")


def load_cifar10(options: CifarOptions, _seed: int = 0) -> Data:
    """CIFAR-10 from ``root/cifar-10-batches-py/`` (torchvision's layout): the first
    ``num_train`` of the 50,000 training images (batches 1..5 in order) and the first
    ``num_test`` test images, as float32 NCHW normalised with the dataset's per-channel mean
    and std; the worker applies crop+flip (``bench.augment``) on the device."""
    return load_cifar(options, CIFAR10_MEAN, CIFAR10_STD)


def load_cifar100(options: CifarOptions, _seed: int = 0) -> Data:
    """CIFAR-100 from ``root/cifar-100-python/{train,test}`` with the 100 fine labels."""
    return load_cifar(options, CIFAR100_MEAN, CIFAR100_STD)


def ensure_cifar(layout: CifarLayout, root: Path, download: bool) -> None:
    """Raise naming the folder when files are missing; with ``download``, fetch them first.
    Call it once on the driver before starting workers so they do not all download."""
    folder = root / layout.folder
    missing = [f for f in layout.train_files + layout.test_files if not (folder / f).is_file()]
    if not missing:
        return
    if not download:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)} (set download: true, or point root "
                                f"at the folder that contains {layout.folder}/)")
    download_and_extract(layout.url, layout.md5, root, layout.folder)


def download_and_extract(url: str, md5: str, root: Path, folder: str) -> None:
    """Stream ``url`` to a temp file under ``root``, check its MD5, unpack, then move ``folder``
    into place with one rename, so concurrent callers never see a half-written folder."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        archive, digest = Path(tmp) / "archive.tar.gz", hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"{url}: MD5 {digest.hexdigest()} does not match the expected {md5}")
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(Path(tmp) / "x", filter="data")  # "data": no absolute paths, links or ..
        if not (root / folder).exists():
            shutil.move(str(Path(tmp) / "x" / folder), str(root / folder))


# --- ImageNet: a streaming dataset (transforms in bench.augment) -----------------------------

class ImageFolderDataset(Dataset):
    """Items are (uint8 CHW image, label). Paths sit in one NumPy bytes array, not a list of
    Python strings, so forked DataLoader processes do not copy them page by page."""

    def __init__(self, split_dir: Path, classes: list[str], train: bool, size: int = 224) -> None:
        samples = list(iter_image_folder(split_dir, classes))
        self.paths = np.array([os.fsencode(p) for p, _ in samples], dtype=np.bytes_)
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.train, self.size = train, size

    def __len__(self) -> int:
        return len(self.labels)

    def evaluation_view(self, count: int) -> Subset:
        """``count`` evenly spaced images of this split (every class represented, the same
        ones at every epoch and batch size) read with the deterministic val transform: what
        the train accuracy and loss are measured on, since scoring all 1.28M images each
        evaluation would cost about as much as a training epoch."""
        view = copy.copy(self)  # shares the path and label arrays
        view.train = False
        picks = np.linspace(0, len(self) - 1, num=min(count, len(self))).round().astype(np.int64)
        return Subset(view, np.unique(picks).tolist())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(os.fsdecode(self.paths[index])) as img:
            rgb = img.convert("RGB")  # ImageNet has CMYK and greyscale JPEGs too
        x = train_transform(rgb, self.size) if self.train else val_transform(rgb, self.size)
        return x, int(self.labels[index])


class StepBatchSampler(Sampler[list[int]]):
    """One index list per optimizer step: this rank's share of the global batch in the order
    of ``epoch_permutation(seed, epoch)``, positions rank, rank + R, rank + 2R, ... (exactly the
    resident-data path's sharding, ``bench.feed.step_indices``). Yields ``steps_per_epoch``
    lists (the plan's count; in a short final batch ranks differ by at most one sample)."""

    def __init__(self, num_samples: int, global_batch_size: int, steps_per_epoch: int,
                 rank: int, num_replicas: int, seed: int) -> None:
        self.num_samples, self.global_batch_size = num_samples, global_batch_size
        self.steps_per_epoch, self.rank, self.num_replicas = steps_per_epoch, rank, num_replicas
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        for step in range(self.steps_per_epoch):
            batch = order[step * self.global_batch_size:(step + 1) * self.global_batch_size]
            yield batch[self.rank::self.num_replicas].tolist()


class ShardSampler(Sampler[int]):
    """Evaluation: rank r reads r, r + R, r + 2R, ... — every sample exactly once, no padding,
    so summing (correct, count) over ranks gives the exact accuracy."""

    def __init__(self, num_samples: int, rank: int, num_replicas: int) -> None:
        self.indices = range(rank, num_samples, num_replicas)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


@dataclass
class StreamingData:
    """A workload too big for memory: Datasets of (uint8 CHW image, label) read by DataLoader
    processes — ``train`` (augmented), ``test``, and ``train_eval`` (training images with the
    evaluation transform, on which train accuracy is measured). How ``bench.feed.StreamFeed``
    uses it::

        loader = data.train_loader(global_batch_size=..., steps_per_epoch=plan.steps_per_epoch,
                                   rank=rank, num_replicas=world_size, seed=plan.seed)
        for epoch in range(plan.epochs):
            loader.batch_sampler.set_epoch(epoch)
            for images_u8, labels in loader:   # this rank's share of one global batch
                x = data.to_device(images_u8, device, channels_last=...)  # float, normalised
                y = labels.to(device, non_blocking=True)

    Batches arrive in pinned memory (with CUDA) as uint8, a quarter of float32's bytes over
    PCIe; normalisation happens on the device. ``num_loader_workers`` processes per rank
    decode JPEGs, each keeping ``prefetch_factor`` batches ready, and they persist across
    epochs. Split a per-rank batch into micro-batches on the device for accumulation.
    """

    train: Dataset
    test: Dataset
    train_eval: Dataset
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_shape: tuple[int, ...] = (3, 224, 224)  # one sample as the model sees it, for build_model
    num_loader_workers: int = 8
    prefetch_factor: int = 4
    augment: str = "none"  # augmentation happens in the train Dataset's transform

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_test(self) -> int:
        return len(self.test)

    def _loader_settings(self, seed: int, rank: int, persistent: bool = True) -> dict:
        busy = self.num_loader_workers > 0
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)  # seeds the loader processes
        return dict(num_workers=self.num_loader_workers, pin_memory=torch.cuda.is_available(),
                    persistent_workers=busy and persistent,
                    prefetch_factor=self.prefetch_factor if busy else None, generator=generator)

    def train_loader(self, *, global_batch_size: int, steps_per_epoch: int, rank: int,
                     num_replicas: int, seed: int) -> DataLoader:
        sampler = StepBatchSampler(self.num_train, global_batch_size, steps_per_epoch, rank, num_replicas, seed)
        return DataLoader(self.train, batch_sampler=sampler, **self._loader_settings(seed, rank))

    def eval_loader(self, split: str, *, batch_size: int, rank: int, num_replicas: int) -> DataLoader:
        """This rank's share of ``split`` ("train" = the ``train_eval`` view, or "test"), each image
        once. Its processes live for one pass only: an evaluation is rare, and persistent ones
        would hold two more sets of decoders per rank for the whole run."""
        dataset = self.train_eval if split == "train" else self.test
        return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, num_replicas),
                          **self._loader_settings(0, rank, persistent=False))

    def to_device(self, images_u8: torch.Tensor, device: torch.device | str,
                  channels_last: bool = False) -> torch.Tensor:
        x = images_u8.to(device, non_blocking=True).float().div_(255.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(torch.tensor(self.std, device=x.device).view(1, -1, 1, 1))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def load_imagenet(options: ImageNetOptions, _seed: int = 0) -> StreamingData:
    """ImageNet in ImageFolder layout, streamed: train = random resized crop 224 + flip,
    val = resize 256 + centre crop 224 (also on the ``train_eval_samples`` training images the
    train metrics use). Labels are sorted class-folder indices."""
    root = Path(options.root).expanduser()
    classes = image_folder_classes(root / "train")  # the options checked val/ holds the same
    train = ImageFolderDataset(root / "train", classes, train=True)
    return StreamingData(train, ImageFolderDataset(root / "val", classes, train=False),
                         train.evaluation_view(options.train_eval_samples),
                         num_classes=len(classes), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                         num_loader_workers=options.num_loader_workers,
                         prefetch_factor=options.prefetch_factor)


# --- generated workloads ---------------------------------------------------------------------

SHAPES_CLASSES = ("circle", "square", "triangle", "cross", "ring",
                  "horizontal_stripes", "vertical_stripes", "checker", "diagonal_stripes", "dots")
SHAPES_MEAN, SHAPES_STD = 0.5, 0.3  # fixed, not measured: reductions could differ across machines
_SHAPES_CHUNK = 1024  # images per generator stream; fixed, so a smaller set is a prefix of a larger


def generate_shapes(num_images: int, data_seed: int, split: str, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, 32, 32), int64 labels) of the shapes set; classes balanced per 1024.

    Bit-identical on every machine: only ``torch.rand``/``randperm`` on CPU generators, and
    elementwise +, -, *, /, sqrt, floor and comparisons (IEEE-exact; no transcendental
    functions, no float reductions, no fused ops). Each chunk of 1024 has its own generator
    seeded by (data_seed, split, chunk), so ``num_images`` only truncates.
    """
    split_id = {"train": 0, "test": 1}[split]
    images, labels = [], []
    for chunk in range(math.ceil(num_images / _SHAPES_CHUNK)):
        g = torch.Generator().manual_seed((data_seed * 2 + split_id) * 1_000_003 + chunk)
        x, y = _shapes_chunk(g, noise)
        images.append(x)
        labels.append(y)
    return torch.cat(images)[:num_images], torch.cat(labels)[:num_images]


def _shapes_chunk(g: torch.Generator, noise: float, k: int = _SHAPES_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    u = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731 (every draw, every image)
    labels = (torch.arange(k) % 10)[torch.randperm(k, generator=g)]
    cx, cy, radius = (8 + 16 * u(k, 1, 1), 8 + 16 * u(k, 1, 1), 5 + 6 * u(k, 1, 1))  # pixels
    a, b = 2 * u(k, 1, 1) - 1, 2 * u(k, 1, 1) - 1
    norm = (a * a + b * b).sqrt().clamp_min(1e-3)
    cos, sin = a / norm, b / norm  # a random rotation without calling cos/sin
    period, phase, diag = 3 + 3 * u(k, 1, 1), 6 * u(k, 1, 1), torch.where(u(k, 1, 1) < 0.5, 1.0, -1.0)
    bg = u(k, 3, 1, 1)
    fg = bg + 0.3 + 0.4 * u(k, 3, 1, 1)
    fg = torch.where(fg >= 1, fg - 1, fg)  # wrap to 0..1: every channel differs from bg by 0.3..0.7
    slope = (u(k, 3, 1, 1) - 0.5) * 0.5, 2 * u(k, 1, 1, 1) - 1, 2 * u(k, 1, 1, 1) - 1
    pixel_noise = (u(k, 3, 32, 32) - 0.5) * (noise * 12 ** 0.5)  # uniform, std = noise

    xs = torch.arange(32, dtype=torch.float32).view(1, 1, 32) + 0.5
    ys = xs.view(1, 32, 1)
    dx, dy = xs - cx, ys - cy
    pu, pv = (cos * dx + sin * dy) / radius, (cos * dy - sin * dx) / radius  # rotated, unit size
    masks = _shape_masks(pu, pv) + _texture_masks(xs, ys, pu, pv, period, phase, diag)
    mask = torch.zeros(k, 32, 32, dtype=torch.bool)
    for c, m in enumerate(masks):
        mask |= m & (labels == c).view(k, 1, 1)

    background = bg + slope[0] * (slope[1] * (xs - 16) + slope[2] * (ys - 16)) / 16
    x = torch.where(mask.unsqueeze(1), fg, background) + pixel_noise
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


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


def load_shapes(options: ShapesOptions, _seed: int = 0) -> Data:
    """10 classes of shapes and textures (``SHAPES_CLASSES``) with random colour, position,
    size, rotation, background gradient and pixel noise; the data depend only on the options
    (``data_seed``), never on the run seed."""
    x_tr, y_tr = generate_shapes(options.num_train, options.data_seed, "train", options.noise)
    x_te, y_te = generate_shapes(options.num_test, options.data_seed, "test", options.noise)
    mean, std = (SHAPES_MEAN,) * 3, (SHAPES_STD,) * 3
    return Data(_normalise(x_tr, mean, std), y_tr, _normalise(x_te, mean, std), y_te,
                num_classes=10, augment="none")


def load_synthetic(options: SyntheticOptions, seed: int = 0) -> Data:
    """Random N(0, 1) images and uniform labels (nothing to learn): throughput runs only.
    512 distinct images are tiled to num_train so generating a large set stays cheap."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, options.image_size, options.image_size)

    def split(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.randn((min(count, 512), *shape), generator=g)
        return pool[torch.arange(count) % len(pool)], torch.randint(0, options.num_classes, (count,), generator=g)

    (x_tr, y_tr), (x_te, y_te) = split(options.num_train), split(options.num_test)
    return Data(x_tr, y_tr, x_te, y_te, num_classes=options.num_classes, augment="none")
