"""Public ops: argument validation, the torch.ops call, fake implementations and autograd."""
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .linear_scan import linear_scan

__all__ = ["causal_conv1d", "causal_conv1d_update", "linear_scan"]
