"""Public ops: argument validation, the torch.ops call, fake implementations and autograd."""
from .causal_conv1d import causal_conv1d, causal_conv1d_update
from .ssd import ssd_scan

__all__ = ["causal_conv1d", "causal_conv1d_update", "ssd_scan"]
