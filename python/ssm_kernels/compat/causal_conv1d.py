"""Drop-in replacements for the `causal_conv1d` package (Dao-AILab/causal-conv1d).

    from ssm_kernels.compat.causal_conv1d import causal_conv1d_fn, causal_conv1d_update

Same names, signatures and conventions: x is (batch, dim, seqlen), weight (dim, width),
activation None / "silu" / "swish".
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import causal_conv1d as _conv
from ..ops import causal_conv1d_update as _update

__all__ = ["causal_conv1d_fn", "causal_conv1d_update"]


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
):
    """causal_conv1d.causal_conv1d_fn: out, or (out, final_states) with return_final_states.

    final_states_out, when given, receives the final states in place (and is what is returned).
    """
    out = _conv(x, weight, bias, activation, initial_states, return_final_states, seq_idx)
    if not return_final_states:
        return out
    out, final_states = out
    if final_states_out is not None:
        final_states_out.copy_(final_states)
        final_states = final_states_out
    return out, final_states


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    cache_seqlens: Optional[torch.Tensor] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """causal_conv1d.causal_conv1d_update; updates conv_state in place.

    cache_seqlens (batch,) int32 treats each state row as a circular buffer whose oldest entry
    sits at index cache_seqlens % state_len (the package's convention); the new inputs are written
    at cache_seqlens, cache_seqlens + 1, ... (mod state_len).
    """
    if cache_seqlens is None:
        return _update(x, conv_state, weight, bias, activation, conv_state_indices)
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (x.shape[0],):
        got = tuple(cache_seqlens.shape) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise ValueError(f"cache_seqlens: expected shape ({x.shape[0]},), got {got}")
    rows = conv_state_indices.long() if conv_state_indices is not None else torch.arange(x.shape[0], device=x.device)
    valid = rows >= 0
    safe_rows = rows.clamp(min=0)
    state_len = conv_state.shape[-1]
    seqlen = 1 if x.dim() == 2 else x.shape[-1]
    pos = torch.arange(state_len, device=x.device)
    start = cache_seqlens.long() % state_len  # [B]
    order = (start[:, None] + pos) % state_len  # [B, S]: physical index of the i-th oldest entry
    gathered = conv_state[safe_rows]  # [B, D, S]
    ordered = torch.gather(gathered, -1, order[:, None, :].expand_as(gathered)).contiguous()
    out = _update(x, ordered, weight, bias, activation, None)
    # back to physical positions: the i-th oldest entry now lives at (start + seqlen + i) % S
    new_order = (start[:, None] + seqlen + pos) % state_len
    physical = torch.empty_like(ordered).scatter_(-1, new_order[:, None, :].expand_as(ordered), ordered)
    conv_state[safe_rows[valid]] = physical[valid]
    return out * valid.view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
