"""Benchmark scripts, run from the repository root as ``python -m benchmarks.<name>``; results under
``benchmarks/results/``. Not part of the installed package and never collected by pytest."""
