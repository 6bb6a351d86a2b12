"""Benchmarks behind `ssm-kernels bench`: a registry entry per op and the runner.

Not to be confused with the top-level bench/ folder: this package is the measuring code (the
`ssm-kernels bench` command); bench/ holds the GPU-machine scripts (gpu_check.sh, fetch_peers.sh,
build_peers.py) and the measured tables (bench/results/).
"""
from . import causal_conv1d  # noqa: F401  (registers)
from . import fftconv  # noqa: F401  (registers)
from . import linear_scan  # noqa: F401  (registers)
from . import packed  # noqa: F401  (registers)
from . import mamba3  # noqa: F401  (registers)
from . import s4_kernels  # noqa: F401  (registers)
from . import selective_scan  # noqa: F401  (registers)
from . import ssd  # noqa: F401  (registers)
from . import varlen  # noqa: F401  (registers)
from .registry import REGISTRY, BenchOp, register

__all__ = ["REGISTRY", "BenchOp", "register"]
