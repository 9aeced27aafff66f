"""Benchmarks are run by hand (``python -m tests.perf.bench_<name>``), never by pytest."""

collect_ignore_glob = ["bench_*.py"]
