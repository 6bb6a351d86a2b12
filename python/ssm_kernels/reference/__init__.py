"""Float64 loop-form reference implementations of every ssm_kernels op.

Each function has the signature and semantics of the public op of the same name, computes in
float64 (complex128 for complex inputs), returns float64/complex128 and is differentiable by
autograd. The compiled kernels are tested against these.
"""

from .causal_conv1d import causal_conv1d
from .causal_conv1d_update import causal_conv1d_update
from .cauchy import cauchy
from .fftconv import fftconv
from .linear_scan import linear_scan
from .mamba3 import mamba3_scan, mamba3_step
from .selective_scan import selective_scan, selective_state_update
from .ssd import ssd_scan
from .vandermonde import log_vandermonde, log_vandermonde_transpose

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "cauchy",
    "fftconv",
    "linear_scan",
    "log_vandermonde",
    "log_vandermonde_transpose",
    "mamba3_scan",
    "mamba3_step",
    "selective_scan",
    "selective_state_update",
    "ssd_scan",
]
