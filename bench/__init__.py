"""Benchmarks, run from the repository root as modules: `python -m bench.run_all`, `python -m bench.bench_step`."""
