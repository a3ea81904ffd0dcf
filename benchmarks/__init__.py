"""Benchmarks of rkkd_kernels: every backend against the eager and the compiled reference.

Run ``python -m benchmarks.bench_kendall --help`` from the repository root.
"""
