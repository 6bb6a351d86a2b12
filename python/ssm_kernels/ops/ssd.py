"""Mamba-2 chunked SSD scan (API.md: Mamba-2: chunked SSD)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _op


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Sequence[float] = (0.0, float("inf")),
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Mamba-2 SSD scan, computed chunk by chunk (the state-space-duality algorithm).

    Per (batch b, head h): dt_t = dt_t + dt_bias[h], softplus if dt_softplus, clamped to dt_limit
    (when it is not (0, inf));  H_t = exp(dt_t A[h]) H_{t-1} + dt_t outer(x_t, B_t)  (headdim x
    dstate);  y_t = H_t C_t + D x_t;  y_t *= silu(z_t) if z is given.  H_0 = initial_states (or 0);
    the state is reset to zero where seq_idx changes. The result depends on chunk_size only by
    rounding. Same semantics as mamba_ssm's mamba_chunk_scan_combined.

    Args:
        x: [B, L, H, P] float32/float16/bfloat16 (float64 accepted), any strides; P <= 256.
        dt: [B, L, H], x's dtype.
        A: [H] float (usually negative).
        B, C: [B, L, G, N], x's dtype; H % G == 0, head h uses group h // (H // G); N <= 256.
        chunk_size: a power of two in [16, 256].
        D: [H, P] or [H], float; z: [B, L, H, P] in x's dtype; dt_bias: [H] float.
        dt_softplus: apply softplus to dt (after dt_bias).
        dt_limit: (lo, hi) with lo <= hi.
        initial_states: [B, H, P, N] float32 (float64 with float64 inputs); differentiable.
        seq_idx: [B, L] int32, non-decreasing along L (packed variable-length sequences).
        return_final_states: also return H_L, [B, H, P, N] float32; gradients through it flow.
        cu_seqlens: [num_seqs + 1] int32/int64 offsets of packed sequences in the one row
            (batch 1): sequence s is tokens cu_seqlens[s] .. cu_seqlens[s + 1] - 1, and starts from
            initial_states[s] (then [num_seqs, H, P, N]) or zero. final_states is then
            [num_seqs, H, P, N], the state at each sequence's last token (an empty sequence's is
            its initial state). Not together with seq_idx.

    Returns:
        y [B, L, H, P] in x's dtype, or (y, final_states).

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape, device or value
        (chunk_size not a power of two in range, groups not dividing nheads, dt_limit not a
        (lo, hi) pair with lo <= hi, seq_idx decreasing, cu_seqlens not starting at 0,
        decreasing or not ending at seqlen, batch > 1 with cu_seqlens, both cu_seqlens and
        seq_idx). The seq_idx order is checked for CPU
        tensors only (reading CUDA values would synchronise): on CUDA a decreasing seq_idx gives
        unspecified values, but never an out-of-bounds access.

    Example:
        >>> x = torch.randn(1, 100, 4, 16); dt = torch.rand(1, 100, 4); A = -torch.rand(4)
        >>> B = torch.randn(1, 100, 1, 32); C = torch.randn(1, 100, 1, 32)
        >>> y = ssd_scan(x, dt, A, B, C, chunk_size=64, D=torch.ones(4))
    """
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states: expected a bool, got {type(return_final_states).__name__}")
    out, final_states = _op.call(
        "ssd_scan_fwd", x=x, dt=dt, A=A, B=B, C=C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states, seq_idx=seq_idx,
        cu_seqlens=cu_seqlens,
    )
    return (out, final_states) if return_final_states else out


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_op.fake("ssd_scan_fwd")
def _(x, B, cu_seqlens):
    batch, seqlen, nheads, headdim = x.shape
    states = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    return x.new_empty(x.shape), x.new_empty((states, nheads, headdim, B.shape[3]), dtype=_acc_dtype(x))


_op.register("ssd_scan_fwd", "ssd_scan_bwd")
