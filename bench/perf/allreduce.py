"""All-reduce bus bandwidth and latency against message size, as nccl-tests prints them
(``python -m bench.perf allreduce``).

For each message size from ``--min-bytes`` to ``--max-bytes`` (x ``--factor``, default 4 B to
256 MiB doubling), every rank: checks one all-reduce (buffer filled with rank + 1, every element
must come back as n(n + 1)/2: nccl-tests' #wrong), runs ``--warmup-iters`` untimed ones, then
times ``--iters`` in-place sum all-reduces between barriers (the GPU synchronised on both sides).
Reported per size: time = mean per all-reduce, averaged over the ranks (nccl-tests' default
``-a 1``); algbw = size / time; busbw = algbw x 2(n - 1)/n; GB/s are 10^9 bytes/s. The table goes
to stdout as rows arrive, with the average busbw and the alpha-beta ring fit at the end
(``bench.comm.fit_ring``; not stored: readers refit from the rows), and the rows with the
machine to ``<results-dir>/<system>/allreduce-<backend>-w<N>.json`` (``bench.comm.AllreduceResult``).

Backends: gloo over CPU tensors, one process per rank on this machine; NCCL over CUDA tensors,
one process per GPU (needs >= 2 GPUs).

Processes: ``torch.multiprocessing`` (spawn), rendezvous through a file in a temporary folder,
not Ray Train workers. The benchmark measures the collective, not the launcher: a Ray worker
group takes 10-30 s to start and adds a controller and Ray's threads to a 2-core machine, and
its gloo group is the same ``torch.distributed`` gloo these processes open; nccl-tests too runs
one plain process per rank. Each process keeps ``--threads`` torch threads (1 by default, as a
Ray Train worker with ``CPU: 1`` does). What this cannot do is span nodes: that needs a launcher
on every node (torchrun, Ray Train) and is not done here.

torch is imported inside functions, so reading a result file (``load``) does not import it.
Must not import: ray.
"""

from __future__ import annotations

import argparse
import os
import queue as queue_mod
import re
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

from bench.comm import GB, AllreduceResult, AllreduceRow, algbw_bytes_per_s, busbw_bytes_per_s
from bench.errors import BatchscaleError, LauncherError, UserError

DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}
_SIZE = re.compile(r"^(\d+)([KMG]?)$", re.I)


def parse_size(text: str) -> int:
    """'4', '64K', '256M', '1G' -> bytes (K/M/G are powers of 1024, as nccl-tests reads them)."""
    m = _SIZE.match(str(text).strip())
    if not m:
        raise ValueError(f"size {text!r}: use bytes with an optional K, M or G suffix, e.g. 4, 64K, 256M")
    return int(m[1]) * 1024 ** " KMG".index((m[2] or " ").upper())


def message_sizes(min_bytes: int, max_bytes: int, factor: int, element_bytes: int) -> list[int]:
    """min, min x factor, ... <= max, each rounded down to whole elements (at least one)."""
    if min_bytes < 1 or max_bytes < min_bytes or factor < 2:
        raise ValueError(f"need 1 <= min ({min_bytes}) <= max ({max_bytes}) and factor >= 2 ({factor})")
    sizes, s = [], min_bytes
    while s <= max_bytes:
        sizes.append(max(element_bytes, s // element_bytes * element_bytes))
        s *= factor
    return sorted(set(sizes))


def output_path(results_dir: Path, system: str, backend: str, num_workers: int) -> Path:
    return Path(results_dir) / system / f"allreduce-{backend}-w{num_workers}.json"


def load(path: Path | str) -> AllreduceResult:
    """A stored result, read through safeio and validated (ValueError names the file)."""
    from pydantic import ValidationError

    from bench import safeio

    try:
        return AllreduceResult.model_validate(safeio.read_json(path, "json"))
    except ValidationError as err:
        raise ValueError(f"{path}: not an all-reduce result ({err.errors()[0]['loc']}: "
                         f"{err.errors()[0]['msg']})") from None


# --- the ranks ------------------------------------------------------------------------------

def _rank_main(rank: int, world: int, init_file: str, backend: str, dtype: str, sizes: list[int],
               warmup_iters: int, iters: int, threads: int, timeout_s: float, rows: Any) -> None:
    """One rank: every size in turn; rank 0 puts each row on ``rows`` (None when done)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    expected = world * (world + 1) / 2
    try:
        for size in sizes:
            count = size // DTYPES[dtype]
            buf = torch.full((count,), float(rank + 1), dtype=getattr(torch, dtype), device=device)
            dist.all_reduce(buf)
            wrong = int((buf != expected).sum())
            buf.zero_()  # repeated sums of zeros stay finite
            for _ in range(warmup_iters):
                dist.all_reduce(buf)
            sync()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(buf)
            sync()
            elapsed_s = time.perf_counter() - t0
            totals = torch.tensor([elapsed_s / iters, float(wrong)], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            if rank == 0:
                mean_s, num_wrong = totals[0].item() / world, int(totals[1].item())
                algbw = algbw_bytes_per_s(size, mean_s)
                rows.put(AllreduceRow(size_bytes=size, count=count, time_us=mean_s * 1e6, algbw_gb_s=algbw / GB,
                                      busbw_gb_s=busbw_bytes_per_s(algbw, world) / GB,
                                      num_wrong=num_wrong).model_dump())
        if rank == 0:
            rows.put(None)
    finally:
        dist.destroy_process_group()


def run(backend: str, num_workers: int, sizes: list[int], *, dtype: str = "float32", warmup_iters: int = 1,
        iters: int = 20, threads: int = 1, timeout_s: float = 300.0,
        on_row: Callable[[AllreduceRow], None] | None = None) -> list[AllreduceRow]:
    """Start ``num_workers`` ranks, collect rank 0's rows (``on_row`` sees each as it comes)."""
    import torch.multiprocessing as tmp

    ctx = tmp.get_context("spawn")
    rows_q = ctx.Queue()
    rows: list[AllreduceRow] = []
    with tempfile.TemporaryDirectory(prefix="batchscale-allreduce-") as tmpdir:
        init_file = os.path.join(tmpdir, "rendezvous")
        args = (num_workers, init_file, backend, dtype, sizes, warmup_iters, iters, threads, timeout_s, rows_q)
        procs = tmp.start_processes(_rank_main, args=args, nprocs=num_workers, join=False, start_method="spawn")
        done = False

        def drain(block_s: float) -> None:
            nonlocal done
            try:
                while not done:
                    item = rows_q.get(timeout=block_s)
                    if item is None:
                        done = True
                    else:
                        rows.append(AllreduceRow.model_validate(item))
                        if on_row:
                            on_row(rows[-1])
            except queue_mod.Empty:
                pass

        try:
            while not procs.join(timeout=0.05):
                drain(0.05)
        except Exception as err:  # ProcessRaisedException / ProcessExitedException from a rank
            first = str(err).strip().splitlines()
            raise LauncherError(f"all-reduce benchmark: a rank failed ({first[-1] if first else type(err).__name__})"
                                ) from None
        drain(1.0)
    if not done:
        raise LauncherError(f"all-reduce benchmark: rank 0 stopped after {len(rows)} of {len(sizes)} sizes")
    return rows


# --- CLI ------------------------------------------------------------------------------------

HEADER = (f"#{'size':>12} {'count':>12} {'type':>8} {'redop':>6} {'time(us)':>11} {'algbw(GB/s)':>12} "
          f"{'busbw(GB/s)':>12} {'#wrong':>7}")


def format_row(row: AllreduceRow, dtype: str) -> str:
    return (f" {row.size_bytes:12d} {row.count:12d} {dtype:>8} {'sum':>6} {row.time_us:11.2f} "
            f"{row.algbw_gb_s:12.3f} {row.busbw_gb_s:12.3f} {row.num_wrong:7d}")


def _device_name(backend: str) -> str:
    if backend != "nccl":
        return "cpu"
    import torch

    return torch.cuda.get_device_name(0)


def _check(args: argparse.Namespace) -> list[int]:
    from bench.names import check_name

    try:
        check_name(args.system, "--system")
        sizes = message_sizes(parse_size(args.min_bytes), parse_size(args.max_bytes), args.factor, DTYPES[args.dtype])
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.num_workers < 2:
        raise UserError(f"--num-workers {args.num_workers}: an all-reduce needs >= 2 ranks")
    if args.iters < 1 or args.warmup_iters < 0 or args.threads < 1:
        raise UserError("--iters must be >= 1, --warmup-iters >= 0 and --threads >= 1")
    if args.backend == "nccl":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < args.num_workers:
            raise UserError(f"--backend nccl with --num-workers {args.num_workers} needs as many GPUs; "
                            f"torch sees {gpus} (use --backend gloo on CPU)")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf allreduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo", help="gloo on CPU (default), nccl on GPUs")
    p.add_argument("--num-workers", type=int, default=2, help="ranks, one process each (default 2)")
    p.add_argument("--min-bytes", default="4", help="smallest message (default 4)")
    p.add_argument("--max-bytes", default="256M", help="largest message (default 256M = 256 MiB)")
    p.add_argument("--factor", type=int, default=2, help="size multiplier between rows (default 2)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--warmup-iters", type=int, default=5, help="untimed all-reduces per size (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed all-reduces per size (default 20, as nccl-tests)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="process-group timeout (default 300)")
    p.add_argument("--system", default=re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64] or "local",
                   help="folder under the results dir naming this machine (default: the hostname)")
    p.add_argument("--results-dir", type=Path, default=Path("results"), help="default ./results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.fingerprint import fingerprint
    from bench.store import atomic_write_json

    args = parse_args(argv)
    try:
        sizes = _check(args)
        out = output_path(args.results_dir, args.system, args.backend, args.num_workers)
        print(f"# all-reduce, {args.backend}, {args.num_workers} ranks on {_device_name(args.backend)}, "
              f"{len(sizes)} sizes {sizes[0]}..{sizes[-1]} B, {args.warmup_iters} warm-up + {args.iters} timed "
              f"iterations, {args.threads} thread(s) per rank", flush=True)
        print(HEADER, flush=True)
        rows = run(args.backend, args.num_workers, sizes, dtype=args.dtype, warmup_iters=args.warmup_iters,
                   iters=args.iters, threads=args.threads, timeout_s=args.timeout_s,
                   on_row=lambda r: print(format_row(r, args.dtype), flush=True))
    except BatchscaleError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    result = AllreduceResult(system=args.system, backend=args.backend, num_workers=args.num_workers,
                             device=_device_name(args.backend), dtype=args.dtype, warmup_iters=args.warmup_iters,
                             iters=args.iters, threads_per_worker=args.threads if args.backend == "gloo" else None,
                             machine=fingerprint(), rows=rows)
    print(f"# Out of bounds values : {sum(r.num_wrong for r in rows)}")
    print(f"# Avg bus bandwidth    : {sum(r.busbw_gb_s for r in rows) / len(rows):.4g} GB/s")
    try:
        print(f"# {result.link(str(out)).source}")
    except ValueError as err:
        print(f"# no ring fit: {err}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result.model_dump())
    print(f"# wrote {out}")
    return 0 if all(r.num_wrong == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
