"""`python -m bench.perf NAME [args]`: dispatch to a benchmark a user runs on their own machine or
cluster. The project's own lab tooling (the GPU-lease session, the soak) is in tools/."""

from __future__ import annotations

import sys

SCRIPTS = {
    "telemetry-overhead": "bench.perf.telemetry_overhead",  # sampler off / 10 Hz / 50 Hz
    "overhead": "bench.perf.overhead",  # plain PyTorch loop vs batchscale under Ray Train, A B A B
    "throughput": "bench.perf.throughput",  # samples/s and TFLOP/s across per-GPU batch sizes
    "noise-overhead": "bench.perf.noise_overhead",  # worker step with the noise-scale probe off / on
    "loader": "bench.perf.loader",  # streamed ImageNet pipeline: images/s per DataLoader process
    "allreduce": "bench.perf.allreduce",  # all-reduce busbw and latency per message size, nccl-tests style
    "validate-comm": "bench.perf.validate_comm",  # 2-worker step time predicted from 1-worker runs vs measured
    "checkpoint-cost": "bench.perf.checkpoint_cost",  # the same sweep without / with checkpoints, A B B A
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SCRIPTS:
        print(f"usage: python -m bench.perf {{{','.join(SCRIPTS)}}} [args]", file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(SCRIPTS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
