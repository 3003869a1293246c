"""Benchmark scripts: `python -m bench.perf NAME [args]`."""
