"""Drop-in replacements for mamba_ssm functions, with mamba_ssm's names, signatures and
conventions:

    from ssm_kernels.compat.mamba_ssm import selective_scan_fn, selective_state_update
    from ssm_kernels.compat.mamba_ssm import mamba_chunk_scan_combined
"""
from __future__ import annotations

import torch

from ..ops.selective_scan import selective_scan as _selective_scan
from ..ops.selective_scan import selective_state_update as _selective_state_update
from ._ssd import mamba_chunk_scan_combined

__all__ = ["selective_scan_fn", "selective_state_update", "mamba_chunk_scan_combined"]


def _deinterleave(t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's real layout of a complex variable B/C, [..., N, 2L] with (re, im) of step t at
    positions 2t and 2t + 1, as the complex tensor [..., N, L] (differentiable)."""
    if t.shape[-1] % 2 != 0:
        raise ValueError(f"B/C: expected an even last axis (2 * seqlen, real and imaginary parts), got {t.shape[-1]}")
    real = A.real.dtype
    pairs = t.to(real).reshape(*t.shape[:-1], t.shape[-1] // 2, 2).contiguous()
    return torch.view_as_complex(pairs)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn on ssm_kernels.

    Same arguments and results as mamba_ssm: u, delta [B, D, L]; A [D, N] real or complex;
    B, C fixed [D, N], variable [B, N, L] or grouped [B, G, N, L]. For complex A, variable B/C are
    real tensors [B, (G,) N, 2L] holding (re, im) of each step interleaved along the last axis, as
    mamba_ssm expects; fixed B/C are complex [D, N]. Returns out, or (out, last_state) with the
    final state [B, D, N]. Unlike mamba_ssm, the gradient of last_state is propagated.

    Example:
        >>> out = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    """
    if A.is_complex():
        if B.dim() >= 3:
            B = _deinterleave(B, A)
        if C.dim() >= 3:
            C = _deinterleave(C, A)
    return _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, return_last_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update on ssm_kernels.

    One decode step, updating ``state`` in place: [B, D, N] (x, dt, z [B, D]) or [B, H, P, N]
    (x, dt, z [B, H, P]); A [D, N] / [H, P, N] (stride-0 expanded views are fine); B, C [B, N] /
    [B, G, N]; D, dt_bias [D] / [H, P]; state_batch_indices [B] (negative = padding row, output
    zero). A state kept in float16/bfloat16, which mamba_ssm allows, is updated through a float32
    copy.

    Example:
        >>> out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    """
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if state.dtype == want:
        return _selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    work = state.to(want)
    out = _selective_state_update(work, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    state.copy_(work)
    return out
