"""Resident image workload loaders: CIFAR-10/100 (the official python-pickle files) and synthetic.

Owns: reading the CIFAR files into ``Data`` (through our allow-list unpickler), the CIFAR
download, and the random tensors of ``synthetic``. Option models, sizes and on-disk layouts
live in ``vision_catalog`` (torch-free); ImageNet (streamed) in ``bench.workloads.imagenet``;
the shapes generator in ``bench.workloads.shapes``.

Why our CIFAR reader and not ``torchvision.datasets.CIFAR10``: torchvision checks each file's
MD5 against the official release and then unpickles it with plain ``pickle.load``. That is safe
for the official files, but it refuses every other file in the same format (a subset, a
re-packed copy, the small files our tests write) and needs ``batches.meta``; and the check and
the load open the file separately. Our unpickler accepts nothing but the NumPy arrays, lists and
bytes the format holds, so any file in the format loads, and a file that is not what it claims
cannot run code whatever its checksum (docs/workloads.md).

Must not import: ray, pandas, torchvision. Pickle is only ever read from the user's own CIFAR
folder, and through that unpickler.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

from bench.workloads.data import Data, normalise
from bench.workloads.vision_catalog import CifarLayout, CifarOptions, SyntheticOptions

CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


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
    return Data(normalise(x_tr, mean, std), y_tr, normalise(x_te, mean, std), y_te,
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


# --- generated ------------------------------------------------------------------------------

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
