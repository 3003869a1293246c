"""Image workloads: CIFAR pickles, streamed ImageNet folders (torchvision scan, decode and
transforms), synthetic, the on-device crop+flip. The shapes generator: tests/test_shapes.py.

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

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (docs/workloads.md)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

from bench import workloads
from bench.augment import imagenet_train_transform, imagenet_val_transform, random_crop_flip
from bench.errors import UserError
from bench.models import MODELS
from bench.plan import steps_per_epoch
from bench.workloads import imagenet, vision
from bench.workloads import vision_catalog as cat
from bench.workloads.streaming import StreamingData


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


def test_torchvision_cifar_cannot_read_files_it_has_no_checksum_for(tmp_path):
    """Why bench keeps its own CIFAR reader (docs/workloads.md): torchvision's CIFAR10 reads only
    files whose MD5s match the official release (then with plain pickle.load), so a file in the
    real format that is not the release, as every test here writes, is refused outright. If
    torchvision ever reads such files, this fails, and the decision deserves another look."""
    from torchvision.datasets import CIFAR10

    root = _cifar10_root(tmp_path)
    (root / cat.CIFAR10.folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR10(str(root), train=True)
    assert vision.load_cifar10(cat.CifarOptions(root=str(root), num_train=20, num_test=3)).num_train == 20


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
    data = imagenet.load_imagenet(opts)
    assert isinstance(data, StreamingData) and data.num_classes == 3 and data.input_shape == (3, 224, 224)
    assert data.batch_decoder is None  # no CUDA here: "auto" decodes in the loader processes
    x, label = data.train[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8 and label == 0
    v1, _ = data.test[2]
    assert torch.equal(v1, data.test[2][0])  # val transform is deterministic
    assert data.test[2][1] == 2 and v1.shape == (3, 224, 224)


def test_imagenet_scan_is_torchvisions_imagefolder(tmp_path):
    """Same classes, class -> index mapping (sorted folder names) and files as ImageFolder;
    images in sub-folders count, other files do not."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = _imagenet_root(tmp_path)
    (root / "train" / "n02" / "extra").mkdir()
    Image.new("RGB", (40, 30)).save(root / "train" / "n02" / "extra" / "deep.png")
    scan = imagenet.scan_split(str(root / "train"))
    reference = ImageFolder(str(root / "train"))
    assert list(scan.classes) == reference.classes == ["n01", "n02", "n03"]
    assert [(p.decode(), int(y)) for p, y in zip(scan.paths, scan.labels)] == reference.samples
    assert scan.labels.tolist() == [0, 0, 1, 1, 1, 2, 2] and scan.paths.dtype.kind == "S"
    assert not any(p.endswith(b"notes.txt") for p in scan.paths)


def test_imagenet_class_without_images_is_a_user_error(tmp_path):
    root = _imagenet_root(tmp_path)
    for split in ("train", "val"):
        (root / split / "n04").mkdir()
    opts = cat.ImageNetOptions(root=str(root))  # the folders match: validation passes
    with pytest.raises(UserError, match="n04"):
        workloads.get("imagenet").sizes(opts)


def test_imagenet_loaders_shard_every_step_and_sample(tmp_path):
    data = imagenet.load_imagenet(cat.ImageNetOptions(root=str(_imagenet_root(tmp_path)), num_loader_workers=0))
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
    with pytest.raises(ValidationError, match="decode_on: device decodes with torchvision"):
        cat.ImageNetOptions(root=str(root), decoder="pil", decode_on="device")
    (root / "val" / "n04").mkdir()
    with pytest.raises(ValidationError, match="same class folders"):
        cat.ImageNetOptions(root=str(root))


def _odd_images(folder):
    """The files ImageNet (and ImageFolder) throw at a decoder: CMYK and greyscale JPEGs, a PNG
    named .JPEG, a BMP (a format torchvision.io does not read)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    files = {"rgb.JPEG": (rgb, "JPEG"), "cmyk.JPEG": (rgb.convert("CMYK"), "JPEG"),
             "grey.JPEG": (rgb.convert("L"), "JPEG"), "png.JPEG": (rgb, "PNG"), "x.bmp": (rgb, "BMP")}
    for name, (img, fmt) in files.items():
        img.save(folder / name, format=fmt, quality=90)
    return [folder / name for name in files]


def torchvision_read(path):
    from torchvision.io import read_file

    return read_file(str(path))


def test_torchvision_decode_matches_pillow_on_every_kind_of_file(tmp_path):
    for path in _odd_images(tmp_path):
        ours, pil = imagenet.decode_file(str(path)), imagenet.decode_file(str(path), "pil")
        assert ours.shape == (3, 48, 64) and ours.dtype == torch.uint8, path.name
        # both sides are libjpeg-turbo with the same settings here: identical pixels
        assert torch.equal(ours, pil), path.name


def test_batch_decoder_falls_back_per_image_and_matches_the_loader(tmp_path):
    paths = _odd_images(tmp_path)
    encoded = [torchvision_read(p) for p in paths]
    decoded = imagenet.JpegBatchDecoder.decode(encoded, torch.device("cpu"))
    for img, path in zip(decoded, paths):
        assert torch.equal(img, imagenet.decode_file(str(path))), path.name
    batch, labels = imagenet.JpegBatchDecoder.collate([(e, i) for i, e in enumerate(encoded)])
    assert labels.tolist() == [0, 1, 2, 3, 4] and len(batch) == 2  # two tensors, whatever the batch size
    assert all(torch.equal(a, b) for a, b in zip(imagenet.JpegBatchDecoder.split(batch), encoded))
    val = imagenet_val_transform(32, 40)
    decoder = imagenet.JpegBatchDecoder(imagenet_train_transform(32), val)
    out = decoder(batch, torch.device("cpu"), False, torch.Generator())
    assert out.shape == (5, 3, 32, 32) and torch.equal(out[1], val(imagenet.decode_file(str(paths[1]))))
    a = decoder(batch, torch.device("cpu"), True, torch.Generator().manual_seed(4))
    assert torch.equal(a, decoder(batch, torch.device("cpu"), True, torch.Generator().manual_seed(4)))
    assert not torch.equal(a, decoder(batch, torch.device("cpu"), True, torch.Generator().manual_seed(5)))


def test_decoding_on_the_device_gives_the_loaders_evaluation_batches(tmp_path):
    """decode_on: device (here on the CPU, as CI has no GPU): the loader ships encoded files and
    to_device decodes them; evaluation (deterministic) matches the loader-decoded path exactly."""
    root = _imagenet_root(tmp_path)
    on_loader = imagenet.load_imagenet(cat.ImageNetOptions(root=str(root), num_loader_workers=0, decode_on="loader"))
    on_device = imagenet.load_imagenet(cat.ImageNetOptions(root=str(root), num_loader_workers=0, decode_on="device"))
    assert on_device.batch_decoder is not None and on_device.train[0][0].dim() == 1  # encoded bytes
    for split in ("test", "train"):
        (xa, ya), = list(on_loader.eval_loader(split, batch_size=8, rank=0, num_replicas=1))
        (xb, yb), = list(on_device.eval_loader(split, batch_size=8, rank=0, num_replicas=1))
        assert isinstance(xb, (tuple, list)) and torch.equal(ya, yb)  # (bytes, lengths)
        assert torch.equal(on_loader.to_device(xa, "cpu"), on_device.to_device(xb, "cpu"))
    loader = on_device.train_loader(global_batch_size=4, steps_per_epoch=1, rank=0, num_replicas=1, seed=0)
    images, labels = next(iter(loader))
    x = on_device.to_device(images, "cpu", train=True, rng=torch.Generator().manual_seed(1))
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.float32 and labels.shape == (4,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nvjpeg)")
def test_batched_nvjpeg_decode_on_cuda(tmp_path):
    paths = _odd_images(tmp_path)
    encoded = [torchvision_read(p) for p in paths]
    decoded = imagenet.JpegBatchDecoder.decode(encoded, torch.device("cuda"))
    for img, path in zip(decoded, paths):
        cpu = imagenet.decode_file(str(path))
        assert img.device.type == "cuda" and img.shape == cpu.shape
        assert (img.cpu().float() - cpu.float()).abs().mean() < 2.0, path.name  # IDCTs differ slightly
    decoder = imagenet.JpegBatchDecoder(imagenet_train_transform(32), imagenet_val_transform(32, 40))
    batch, _ = imagenet.JpegBatchDecoder.collate([(e, 0) for e in encoded])
    out = decoder(batch, torch.device("cuda"), True, torch.Generator().manual_seed(0))
    assert out.shape == (5, 3, 32, 32) and out.device.type == "cuda" and out.dtype == torch.uint8


def test_imagenet_transforms():
    torch.manual_seed(0)
    train, val = imagenet_train_transform(), imagenet_val_transform()
    for h, w in [(375, 500), (500, 375), (10, 2000)]:  # the last one hits the fallback crop
        assert train(torch.zeros(3, h, w, dtype=torch.uint8)).shape == (3, 224, 224)
    red = torch.zeros(3, 240, 320, dtype=torch.uint8)
    red[0] = 255
    out = val(red)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8 and out[0].min() == 255 and out[1].max() == 0
    ramp = torch.arange(320, dtype=torch.uint8).expand(3, 256, 320).contiguous()  # x = column index
    centre = val(ramp)  # 256 high already: resize is a no-op, the crop takes columns 48..271
    assert centre[0, 0, 0] == 48 and centre[0, 0, -1] == 271


# --- generated -------------------------------------------------------------------------------

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
        module, func = info.loader.split(":")
        assert callable(getattr(__import__(module, fromlist=[func]), func))
    assert workloads.get("synthetic").has_accuracy is False
    assert workloads.get("shapes").sizes(cat.ShapesOptions(num_train=7)) == (7, 10_000)


def test_the_catalog_does_not_import_the_package_that_registers_it():
    """No import cycle: vision_catalog imports the registry module, never ``bench.workloads``."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(cat))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    assert "bench.workloads" not in imported and "bench.workloads.registry" in imported
    assert not any(m.split(".")[0] in ("torch", "torchvision") for m in imported)
    assert {info.name for info in cat.ENTRIES} <= set(workloads.REGISTRY)


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
