"""Benchmarks: the proxy harness (`run.py`) and the policy micro-benchmark (`bench_policy.py`)."""
