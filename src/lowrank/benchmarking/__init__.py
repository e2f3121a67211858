"""Benchmark drivers shared by ``benchmarks/*.py`` and ``lowrank bench``: they time and print, the
library stays free of benchmarking code."""
