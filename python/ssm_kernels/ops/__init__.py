"""Public ops: argument validation, the torch.ops call, fake implementations and autograd."""
from .cauchy import cauchy
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .fftconv import fftconv
from .linear_scan import linear_scan
from .mamba3 import mamba3_scan, mamba3_step
from .selective_scan import selective_scan, selective_state_update
from .ssd import ssd_scan
from .vandermonde import log_vandermonde, log_vandermonde_transpose

__all__ = [
    "cauchy",
    "causal_conv1d",
    "causal_conv1d_update",
    "fftconv",
    "linear_scan",
    "mamba3_scan",
    "mamba3_step",
    "selective_scan",
    "selective_state_update",
    "ssd_scan",
    "log_vandermonde",
    "log_vandermonde_transpose",
]
