"""Gated RMSNorm, the output norm of the Mamba-2 block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mamba import check_positive_int


class RMSNormGated(nn.Module):
    """RMSNorm with an optional SiLU gate, normalising over groups of channels.

    The parameters and math of ``mamba_ssm.ops.triton.layernorm_gated.RMSNorm`` (the ``norm`` of
    ``Mamba2``), so its ``weight`` loads unchanged:

        norm_before_gate=False:  out = rmsnorm(x * silu(z)) * weight
        norm_before_gate=True:   out = rmsnorm(x) * weight * silu(z)

    where ``rmsnorm`` divides each group of ``group_size`` consecutive channels by
    ``sqrt(mean(square) + eps)`` (one group over all channels when ``group_size`` is None).
    Computed in float32 (float64 for float64 input); the result has x's dtype.

    Args:
        hidden_size: number of channels (the last axis of x).
        eps: added to the mean square.
        group_size: channels per group; must divide ``hidden_size``.
        norm_before_gate: where the gate is applied (see above).

    Shapes:
        x, z: [..., hidden_size] -> out [..., hidden_size]

    Raises:
        ValueError: hidden_size < 1, or group_size not dividing hidden_size.

    Example:
        >>> norm = RMSNormGated(64, group_size=32, norm_before_gate=False)
        >>> out = norm(torch.randn(2, 10, 64), z=torch.randn(2, 10, 64))
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: Optional[int] = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1
                                       or hidden_size % group_size != 0):
            raise ValueError(f"group_size: expected a positive divisor of hidden_size={hidden_size}, "
                             f"got {group_size!r}")
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = x.dtype
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        x = x.to(wide)
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.to(wide))
        group = self.hidden_size if self.group_size is None else self.group_size
        xg = x.unflatten(-1, (self.hidden_size // group, group))  # [..., G, group]
        rstd = torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + self.eps)
        out = (xg * rstd).flatten(-2) * self.weight.to(wide)
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.to(wide))
        return out.to(dtype)

    def extra_repr(self) -> str:
        return (f"{self.hidden_size}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
