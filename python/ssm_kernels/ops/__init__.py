"""Public ops: argument validation, the torch.ops call, fake implementations and autograd."""
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .cauchy import cauchy
from .vandermonde import log_vandermonde, log_vandermonde_transpose

__all__ = ["causal_conv1d", "causal_conv1d_update", "cauchy", "log_vandermonde", "log_vandermonde_transpose"]
