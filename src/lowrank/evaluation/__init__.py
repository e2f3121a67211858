"""Evaluation harness: perplexity, throughput and memory, shared by every command and benchmark."""

from lowrank.evaluation.memory import MemoryReport, memory_report, tensor_bytes
from lowrank.evaluation.perplexity import NonFiniteLogitsError, PerplexityResult, perplexity
from lowrank.evaluation.throughput import ThroughputResult, paired_throughput, throughput

__all__ = [
    "perplexity",
    "PerplexityResult",
    "NonFiniteLogitsError",
    "throughput",
    "paired_throughput",
    "ThroughputResult",
    "memory_report",
    "MemoryReport",
    "tensor_bytes",
]
