"""How fast does the streamed ImageNet input pipeline feed a GPU? (``python -m bench.perf loader``)

Owns: timing the training input path of the ``imagenet`` workload exactly as a worker runs it
(``bench.workloads.imagenet.load_imagenet`` -> ``StreamingData.train_loader`` -> ``to_device``:
JPEG decode, random resized crop 224 + flip with ``torchvision.transforms.v2``, uint8 batches
collated by DataLoader processes, normalised on ``--device``) at several process counts, with
each decoder side by side: Pillow (``decoder: pil``) and ``torchvision.io`` (libjpeg-turbo;
with ``--decode-on device`` the processes only read the files and the batch is decoded on the
device, nvjpeg on CUDA). Rounds interleave the decoders (pil first in even rounds,
torchvision first in odd ones) so a machine that speeds up or slows down affects both alike;
each round's speed-up is torchvision's images/s over Pillow's in that round, and the median
over rounds is the figure to quote. A GPU step needs ``its images/s ÷ per-process rate``
decoding processes (``num_loader_workers``) per GPU, and as many free CPU cores;
``--gpu-rate`` prints that count.

``--root`` reads a real ImageFolder tree; without it, ``--generate N`` writes N JPEGs of
ImageNet's typical size (500 x 375, quality 90, smooth colour fields plus noise so that they
compress like photos: about 105 KiB, near ImageNet's ~110 KB average) into a temporary folder
first. Each timing reads ``--batches`` batches after one warm-up batch (loader start-up
excluded), in a fresh DataLoader.

Must not import: ray.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

DECODERS = ("pil", "torchvision")


def generate_jpegs(root: Path, count: int, classes: int = 4, size: tuple[int, int] = (500, 375),
                   seed: int = 0) -> Path:
    """``root/{train,val}/cNN/*.JPEG``: ``count`` training images (and a few val ones)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = max(1, min(classes, count))  # train/ and val/ must hold the same class folders
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for split, n in (("train", count), ("val", classes)):
        for i in range(n):
            folder = root / split / f"c{i % classes:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            a, b, c = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(40, 215, 3)
            field = c + 60 * (a * np.sin(xx[..., None] / (20 + 40 * abs(a))) + b * np.cos(yy[..., None] / 37))
            pixels = np.clip(field + rng.normal(0, 26, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:06d}.JPEG", quality=90)
    return root


def time_loader(root: Path, processes: int, batch_size: int, batches: int, decoder: str = "torchvision",
                decode_on: str = "loader", device: str = "cpu") -> dict:
    """Images/s of ``batches`` training batches (after one warm-up batch) through a fresh loader,
    up to normalised float batches on ``device``."""
    from bench.workloads.imagenet import load_imagenet
    from bench.workloads.vision_catalog import ImageNetOptions

    data = load_imagenet(ImageNetOptions(root=str(root), num_loader_workers=processes, prefetch_factor=2,
                                         decoder=decoder, decode_on=decode_on))
    steps = min(batches + 1, data.num_train // batch_size)
    if steps < 2:
        raise ValueError(f"{root} holds {data.num_train} training images: too few for two batches of {batch_size}")
    loader = data.train_loader(global_batch_size=batch_size, steps_per_epoch=steps, rank=0, num_replicas=1, seed=0)
    rng, dev = torch.Generator().manual_seed(0), torch.device(device)
    it = iter(loader)
    data.to_device(next(it)[0], dev, train=True, rng=rng)  # warm-up: processes started, first batch decoded
    t0, images = time.perf_counter(), 0
    for x, _ in it:
        images += data.to_device(x, dev, train=True, rng=rng).shape[0]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    del it, loader
    return {"processes": processes, "decoder": decoder, "images": images, "seconds": seconds,
            "images_per_s": images / seconds, "per_process": images / seconds / max(processes, 1)}


def compare(root: Path, processes: int, batch_size: int, batches: int, rounds: int, decode_on: str,
            device: str) -> dict:
    """Both decoders at one process count, ``rounds`` interleaved rounds: the median images/s of
    each and the per-round speed-up of torchvision over Pillow."""
    rates: dict[str, list[float]] = {d: [] for d in DECODERS}
    images = 0
    for r in range(rounds):
        for decoder in (DECODERS if r % 2 == 0 else DECODERS[::-1]):
            row = time_loader(root, processes, batch_size, batches, decoder,
                              decode_on if decoder == "torchvision" else "loader", device)
            rates[decoder].append(row["images_per_s"])
            images = row["images"]
    speedups = [t / p for t, p in zip(rates["torchvision"], rates["pil"])]
    tv = statistics.median(rates["torchvision"])
    return {"processes": processes, "images": images, "images_per_s": tv, "per_process": tv / max(processes, 1),
            "by_decoder": {d: {"images_per_s_median": statistics.median(v), "images_per_s": v,
                               "per_process": statistics.median(v) / max(processes, 1)} for d, v in rates.items()},
            "speedup_median": statistics.median(speedups), "speedup_min": min(speedups),
            "speedup_max": max(speedups)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, help="an ImageFolder tree (root/train/<class>/...); default: generate")
    p.add_argument("--generate", type=int, default=2048, help="JPEGs to write when --root is not given")
    p.add_argument("--processes", type=int, nargs="+", default=[1, os.cpu_count() or 1],
                   help="DataLoader process counts to time (0: decode in the training process)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=20, help="timed batches per setting and round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both decoders per process count")
    p.add_argument("--decode-on", choices=("loader", "device"), default="loader",
                   help="where torchvision decodes: in the loader processes, or batched on --device")
    p.add_argument("--device", default="cpu", help="where batches end up (cpu, cuda)")
    p.add_argument("--gpu-rate", type=float, help="images/s one GPU trains at: print processes needed")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if min(args.processes) < 0 or min(args.batch_size, args.batches, args.rounds) < 1 or args.generate < 2:
        p.error("--processes must be >= 0; --batch-size, --batches, --rounds >= 1; --generate >= 2")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.root is not None and not (args.root / "train").is_dir():
        p.error(f"--root {args.root}: no train/ folder (ImageFolder layout: root/train/<class>/*.JPEG)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="batchscale-loader-") as tmp:
        root = args.root
        if root is None:
            t0 = time.perf_counter()
            root = generate_jpegs(Path(tmp), args.generate)
            sizes = [f.stat().st_size for f in (root / "train").rglob("*.JPEG")]
            print(f"generated {len(sizes)} JPEGs (500x375, mean {np.mean(sizes) / 1024:.0f} KiB) "
                  f"in {time.perf_counter() - t0:.1f} s")
        rows = []
        for n in args.processes:
            try:
                rows.append(compare(root, n, args.batch_size, args.batches, args.rounds, args.decode_on, args.device))
            except ValueError as err:  # includes the options' ValidationError: print its message only
                errors = getattr(err, "errors", None)
                print(f"error: {errors()[0]['msg'] if callable(errors) else err}", file=sys.stderr)
                return 2
            r = rows[-1]
            for decoder, d in r["by_decoder"].items():
                line = (f"processes {n:>3} {decoder:>11}: {d['images_per_s_median']:8.1f} images/s "
                        f"({d['per_process']:6.1f} per process; rounds "
                        + " ".join(f"{v:.0f}" for v in d["images_per_s"]) + ")")
                if args.gpu_rate and d["per_process"] > 0:
                    line += f"; a GPU at {args.gpu_rate:g} images/s needs ~{args.gpu_rate / d['per_process']:.0f}"
                print(line)
            print(f"processes {n:>3}     speed-up torchvision/pil: median {r['speedup_median']:.3f} "
                  f"(min {r['speedup_min']:.3f}, max {r['speedup_max']:.3f}, {args.rounds} rounds, "
                  f"{r['images']} images each)", flush=True)
    print(f"cpu cores here: {os.cpu_count()}; train transform: decode, random resized crop 224, flip "
          f"(torchvision.transforms.v2); torchvision decodes on {args.decode_on}; batches end on {args.device}")
    if args.json is not None:
        args.json.write_text(json.dumps({"root": str(args.root) if args.root else f"generated {args.generate}",
                                         "batch_size": args.batch_size, "batches": args.batches,
                                         "rounds": args.rounds, "decode_on": args.decode_on, "device": args.device,
                                         "cpu_count": os.cpu_count(), "torch": torch.__version__,
                                         "torchvision": __import__("torchvision").__version__,
                                         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
