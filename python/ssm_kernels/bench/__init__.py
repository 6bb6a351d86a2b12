"""Benchmarks behind `ssm-kernels bench`: a registry entry per op and the runner."""
from . import causal_conv1d  # noqa: F401  (registers)
from . import ssd  # noqa: F401  (registers)
from .registry import REGISTRY, BenchOp, register

__all__ = ["REGISTRY", "BenchOp", "register"]
