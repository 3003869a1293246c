"""Image workloads: CIFAR pickles, streamed ImageNet folders, shapes, synthetic, augmentation.

Every dataset here is written by the test itself (real on-disk formats, a few images)."""

from __future__ import annotations

import hashlib
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from bench import workloads
from bench.augment import random_crop_flip, random_resized_crop_box, train_transform, val_transform
from bench.models import MODELS
from bench.plan import steps_per_epoch
from bench.workloads import vision_catalog as cat  # registers the image workloads
from bench.workloads import vision


# --- CIFAR -----------------------------------------------------------------------------------

def _write_batch(path, images: np.ndarray, labels: list[int], label_key: bytes) -> None:
    # The release's form: a dict with bytes keys, data N x 3072 uint8 (R, G, B planes), labels list.
    batch = {b"batch_label": b"test", label_key: labels, b"data": images.reshape(len(labels), 3072),
             b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def _cifar10_root(tmp_path, per_batch: int = 4, num_test: int = 3):
    folder = tmp_path / cat.CIFAR10.folder
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, name in enumerate(cat.CIFAR10.train_files + cat.CIFAR10.test_files):
        n = num_test if name == "test_batch" else per_batch
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        images[0, 0, 0, 0] = 255  # a known pixel per file
        _write_batch(folder / name, images, [(i + j) % 10 for j in range(n)], b"labels")
    return tmp_path


def test_cifar10_loads_the_pickle_layout(tmp_path):
    root = _cifar10_root(tmp_path)
    data = vision.load_cifar10(cat.CifarOptions(root=str(root), num_train=20, num_test=3))
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_train.dtype == torch.float32
    assert data.num_test == 3 and data.num_classes == 10 and data.augment == "crop_flip"
    assert data.y_train[:5].tolist() == [0, 1, 2, 3, 1]  # batch 1 in order, then batch 2
    expected = (1.0 - vision.CIFAR10_MEAN[0]) / vision.CIFAR10_STD[0]  # pixel 255, red channel
    assert data.x_train[4, 0, 0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_cifar10_subset_and_too_few_images(tmp_path):
    root = _cifar10_root(tmp_path)
    data = vision.load_cifar10(cat.CifarOptions(root=str(root), num_train=6, num_test=2))
    assert (data.num_train, data.num_test) == (6, 2)
    with pytest.raises(ValueError, match="holds 20 training images; the options ask for 21"):
        vision.load_cifar10(cat.CifarOptions(root=str(root), num_train=21, num_test=3))


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / cat.CIFAR100.folder
    folder.mkdir()
    _write_batch(folder / "train", np.zeros((5, 3, 32, 32), np.uint8), [99, 1, 2, 3, 4], b"fine_labels")
    _write_batch(folder / "test", np.zeros((2, 3, 32, 32), np.uint8), [7, 8], b"fine_labels")
    data = vision.load_cifar100(cat.Cifar100Options(root=str(tmp_path), num_train=5, num_test=2))
    assert data.y_train.tolist() == [99, 1, 2, 3, 4] and data.num_classes == 100


def test_missing_cifar_folder_is_refused_at_validation_naming_it(tmp_path):
    with pytest.raises(ValidationError, match=str(tmp_path / "cifar-10-batches-py")):
        cat.CifarOptions(root=str(tmp_path))
    cat.CifarOptions(root=str(tmp_path), download=True)  # download: missing is fine until loading


def test_sweep_validation_refuses_missing_root(tmp_path):
    from bench.config import SweepConfig

    sweep = dict(name="c", workload="cifar10", workload_options={"root": str(tmp_path / "nope")},
                 lr={"reference_lr": 0.1, "reference_batch_size": 128}, epochs=1, global_batch_sizes=[128],
                 target_accuracy=0.9)
    with pytest.raises(ValidationError, match="nope"):
        SweepConfig.model_validate(sweep)


class _Evil:
    def __reduce__(self):
        import os  # os.getcwd, not print: Ray replaces builtins.print once it is imported
        return (os.getcwd, ())


def test_unpickler_refuses_anything_but_arrays(tmp_path):
    folder = _cifar10_root(tmp_path) / cat.CIFAR10.folder
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refers to (posix|os)\.getcwd; only NumPy arrays are allowed"):
        vision.load_cifar10(cat.CifarOptions(root=str(tmp_path), num_train=8, num_test=3))


def test_download_checks_md5_and_extracts(tmp_path):
    (tmp_path / "src").mkdir()
    src = _cifar10_root(tmp_path / "src")
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / cat.CIFAR10.folder, arcname=cat.CIFAR10.folder)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    dest = tmp_path / "dest"
    with pytest.raises(ValueError, match="does not match"):
        vision.download_and_extract(archive.as_uri(), "0" * 32, dest, cat.CIFAR10.folder)
    assert not (dest / cat.CIFAR10.folder).exists() and list(dest.iterdir()) == []
    vision.download_and_extract(archive.as_uri(), md5, dest, cat.CIFAR10.folder)
    assert vision.load_cifar10(cat.CifarOptions(root=str(dest), num_train=20, num_test=3)).num_train == 20


# --- ImageNet (ImageFolder, streamed) ---------------------------------------------------------

def _imagenet_root(tmp_path):
    from PIL import Image

    sizes = [(300, 200), (180, 260), (256, 256)]
    for split, per_class in (("train", 2), ("val", 1)):
        for c, name in enumerate(("n01", "n02", "n03")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(per_class):
                mode = "L" if (c, i) == (2, 0) else "RGB"  # a greyscale JPEG, as ImageNet has
                img = Image.new(mode, sizes[(c + i) % 3], color=40 * c if mode == "L" else (40 * c, 10, 200))
                img.save(tmp_path / split / name / f"img{i}.JPEG", quality=90)
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    return tmp_path


def test_imagenet_sizes_and_items(tmp_path):
    root = _imagenet_root(tmp_path)
    opts = cat.ImageNetOptions(root=str(root), num_loader_workers=0)
    assert workloads.get("imagenet").sizes(opts) == (6, 3)
    data = vision.load_imagenet(opts)
    assert isinstance(data, vision.StreamingData) and data.num_classes == 3 and data.input_shape == (3, 224, 224)
    x, label = data.train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8 and label == 0
    v1, _ = data.test[2]
    assert torch.equal(v1, data.test[2][0])  # val transform is deterministic
    assert data.test[2][1] == 2 and v1.shape == (3, 224, 224)


def test_imagenet_loaders_shard_every_step_and_sample(tmp_path):
    data = vision.load_imagenet(cat.ImageNetOptions(root=str(_imagenet_root(tmp_path)), num_loader_workers=0))
    spe = steps_per_epoch(6, 4, num_workers=2)  # one full batch of 4, a remainder of 2 kept
    seen = []
    for rank in range(2):
        loader = data.train_loader(global_batch_size=4, steps_per_epoch=spe, rank=rank, num_replicas=2, seed=1)
        loader.batch_sampler.set_epoch(3)
        batches = list(loader)
        assert [b[0].shape[0] for b in batches] == [2, 1]
        seen += [i for step in loader.batch_sampler for i in step]
    assert sorted(seen) == list(range(6))
    test_seen = [y for r in range(2) for _, ys in data.eval_loader("test", batch_size=2, rank=r, num_replicas=2)
                 for y in ys.tolist()]
    assert sorted(test_seen) == [0, 1, 2]
    x = data.to_device(batches[0][0], "cpu", channels_last=True)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)


def test_imagenet_options_refuse_bad_layout(tmp_path):
    with pytest.raises(ValidationError, match="train is not a folder"):
        cat.ImageNetOptions(root=str(tmp_path))
    root = _imagenet_root(tmp_path)
    (root / "val" / "n04").mkdir()
    with pytest.raises(ValidationError, match="same class folders"):
        cat.ImageNetOptions(root=str(root))


def test_transforms():
    from PIL import Image

    torch.manual_seed(0)
    for w, h in [(500, 375), (375, 500), (2000, 10)]:  # the last one hits the fallback crop
        left, top, cw, ch = random_resized_crop_box(w, h)
        assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h and cw > 0 and ch > 0
    img = Image.new("RGB", (320, 240), (255, 0, 0))
    assert train_transform(img).shape == (3, 224, 224)
    out = val_transform(img)
    assert out.shape == (3, 224, 224) and out[0].min() == 255 and out[1].max() == 0


# --- generated -------------------------------------------------------------------------------

def test_shapes_is_pinned_deterministic_and_prefix_stable():
    x, y = vision.generate_shapes(64, 0, "train", 0.15)
    digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()
    # Pinned: the same options must give the same bytes on every machine and torch version.
    assert digest == "b2b7107b1130529e4001b6ffd8b78b60b678f181e4e8c5849e4360ea58783420"
    x_big, y_big = vision.generate_shapes(1100, 0, "train", 0.15)
    assert torch.equal(x_big[:64], x) and torch.equal(y_big[:64], y)
    assert y_big[:1024].bincount().tolist() == [103] * 4 + [102] * 6  # balanced per chunk
    assert not torch.equal(vision.generate_shapes(64, 0, "test", 0.15)[0], x)
    assert not torch.equal(vision.generate_shapes(64, 1, "train", 0.15)[0], x)


def test_shapes_loader():
    data = vision.load_shapes(cat.ShapesOptions(num_train=50, num_test=20))
    assert data.x_train.shape == (50, 3, 32, 32) and data.num_test == 20 and data.num_classes == 10
    assert -2 < data.x_train.mean().item() < 2


def test_synthetic():
    opts = cat.SyntheticOptions(num_train=600, num_test=10, image_size=16, num_classes=7)
    data = vision.load_synthetic(opts)
    assert data.x_train.shape == (600, 3, 16, 16) and int(data.y_train.max()) < 7 and data.num_classes == 7
    with pytest.raises(ValidationError, match="GiB"):
        cat.SyntheticOptions(num_train=100_000, image_size=224)
    assert cat.synthetic_default_model(cat.SyntheticOptions(image_size=224)) == "resnet50"
    assert cat.synthetic_default_model(opts) == "resnet18_cifar"


def test_registry_entries():
    for name in ("cifar10", "cifar100", "imagenet", "shapes", "synthetic"):
        info = workloads.get(name)
        assert info.default_model in info.models and set(info.models) <= set(MODELS)
    assert workloads.get("synthetic").has_accuracy is False
    assert workloads.get("shapes").sizes(cat.ShapesOptions(num_train=7)) == (7, 10_000)


# --- augmentation ----------------------------------------------------------------------------

def _windows(image: torch.Tensor, padding: int, mode: str) -> list[torch.Tensor]:
    padded = F.pad(image[None], (padding,) * 4, mode=mode)[0]
    h, w = image.shape[-2:]
    crops = [padded[:, a:a + h, b:b + w] for a in range(2 * padding + 1) for b in range(2 * padding + 1)]
    return crops + [c.flip(-1) for c in crops]


@pytest.mark.parametrize("pad_mode, torch_mode", [("reflect", "reflect"), ("zeros", "constant")])
def test_random_crop_flip_is_a_padded_window(pad_mode, torch_mode):
    x = torch.arange(16 * 2 * 8 * 8, dtype=torch.float32).reshape(16, 2, 8, 8)
    out = random_crop_flip(x, 3, torch.Generator().manual_seed(0), pad_mode=pad_mode)
    assert out.shape == x.shape
    for i in range(16):
        assert any(torch.equal(out[i], win) for win in _windows(x[i], 3, torch_mode))


def test_random_crop_flip_really_flips_and_crops_and_is_seeded():
    x = torch.randn(64, 3, 8, 8)
    flipped = random_crop_flip(x, 0, torch.Generator().manual_seed(1))
    is_flip = [torch.equal(o, xi.flip(-1)) for o, xi in zip(flipped, x)]
    assert all(torch.equal(o, xi) or f for o, xi, f in zip(flipped, x, is_flip)) and 10 < sum(is_flip) < 54
    a = random_crop_flip(x, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a, random_crop_flip(x, 4, torch.Generator().manual_seed(2)))
    moved = sum(not torch.equal(o, xi) and not torch.equal(o, xi.flip(-1)) for o, xi in zip(a, x))
    assert moved > 48  # 80 of 81 offsets move the image
