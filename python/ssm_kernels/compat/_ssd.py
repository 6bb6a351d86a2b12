"""mamba_ssm's mamba_chunk_scan_combined on top of ssm_kernels.ssd_scan (re-exported by
ssm_kernels.compat.mamba_ssm)."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.ssd import ssd_scan


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit=(0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Drop-in for ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``.

    Same arguments and results as mamba_ssm (x [B, L, H, P], dt [B, L, H], A [H], B/C
    [B, L, G, N], D [H, P] or [H], z like x, dt_bias [H], initial_states [B, H, P, N], seq_idx
    [B, L] int32); returns out, or (out, final_states) with return_final_states. See
    ssm_kernels.ssd_scan for the math, dtypes and errors.

    Raises:
        NotImplementedError: for cu_seqlens / return_varlen_states (per-sequence final states of
            packed batches); pack with seq_idx and split the sequences yourself instead.

    Example:
        >>> x = torch.randn(1, 64, 2, 8); dt = torch.rand(1, 64, 2); A = -torch.rand(2)
        >>> y = mamba_chunk_scan_combined(x, dt, A, torch.randn(1, 64, 1, 16), torch.randn(1, 64, 1, 16), 32)
    """
    if cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError(
            "mamba_chunk_scan_combined: cu_seqlens / return_varlen_states are not supported by "
            "ssm_kernels; pass seq_idx for packed sequences (states reset at its changes)"
        )
    return ssd_scan(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
        return_final_states=return_final_states,
    )
