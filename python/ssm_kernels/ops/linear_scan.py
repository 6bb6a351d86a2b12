"""Diagonal linear recurrence h_t = a_t * h_{t-1} + b_t (API.md: diagonal linear recurrence)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _op


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype in (torch.float64, torch.complex64, torch.complex128):
        return dtype
    return torch.float32


def linear_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    initial_state: Optional[torch.Tensor] = None,
    reverse: bool = False,
    return_last_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
):
    """Diagonal (elementwise) linear recurrence over the last axis, accumulated in float32.

    h_t = a_t * h_{t-1} + b_t with h_{-1} = initial_state (zeros if None); with reverse=True the
    recurrence runs from the last step to the first: h_t = a_t * h_{t+1} + b_t.

    Args:
        a, b: [..., L], the same shape and dtype: float32/float16/bfloat16 (float64 accepted) or
            complex64 (complex128 accepted); any strides, any L >= 1, any leading shape.
        initial_state: [...], float32 (float64 for float64 inputs; complex64/complex128 for
            complex inputs); other real (resp. complex) dtypes are converted.
        reverse: run the recurrence from t = L-1 down to 0.
        return_last_state: also return the final state (h at t = L-1, or t = 0 with reverse).
        cu_seqlens: packed sequences (API.md: packed sequences): [S + 1] int32/int64 offsets
            along the last axis, starting at 0, non-decreasing, ending at L, for a of at least 2
            dims whose first axis (the batch) is 1. Sequence s is h[..., cu_seqlens[s]:
            cu_seqlens[s + 1]], run on its own; initial_state and last_state are per sequence,
            [S, *a.shape[1:-1]]. An empty sequence's last state is its initial state.
        seq_idx: [batch, L] int32, non-decreasing along L (a of at least 2 dims, first axis the
            batch): the recurrence restarts from zero where the index changes. initial_state
            (and last_state) stay [...]: they belong to each row's first (last) sequence in the
            recurrence's order (with reverse, initial_state feeds the last sequence along L).
            Not together with cu_seqlens.

    Returns:
        h [..., L] in the dtype of b, or (h, last_state) with last_state [...] in float32
        (complex64; float64/complex128 for double inputs).

    Differentiable in a, b and initial_state, also through last_state.

    Raises:
        TypeError for a non-tensor argument, an unsupported dtype, dtypes of a and b that differ
        or an initial_state that is complex for real inputs (or real for complex ones);
        ValueError for shapes of a and b that differ, seqlen 0, an initial_state of the wrong
        shape, tensors on different devices, or bad cu_seqlens/seq_idx (wrong dtype, batch > 1,
        not starting at 0, decreasing, not ending at L, both given).

    Example:
        >>> a = torch.rand(2, 64, 1000)  # [B, D, L] decays
        >>> b = torch.randn(2, 64, 1000)
        >>> h, last = linear_scan(a, b, return_last_state=True)  # [B, D, L], [B, D]
    """
    if not isinstance(return_last_state, bool):
        raise TypeError(f"return_last_state: expected a bool, got {type(return_last_state).__name__}")
    h, last_state = _op.call(
        "linear_scan_fwd", a=a, b=b, initial_state=initial_state, reverse=reverse, cu_seqlens=cu_seqlens,
        seq_idx=seq_idx,
    )
    return (h, last_state) if return_last_state else h


@_op.fake("linear_scan_fwd")
def _(a, cu_seqlens):
    state_shape = a.shape[:-1] if cu_seqlens is None else (cu_seqlens.shape[0] - 1, *a.shape[1:-1])
    return a.new_empty(a.shape), a.new_empty(state_shape, dtype=_acc_dtype(a.dtype))


_op.register("linear_scan_fwd", "linear_scan_bwd", like={"b": "a"})
