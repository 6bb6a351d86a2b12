"""Diagonal linear recurrence h_t = a_t * h_{t-1} + b_t (API.md: diagonal linear recurrence)."""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import COMPLEX_DTYPES, FLOAT_DTYPES, check_device_supported, check_tensor

SCAN_DTYPES = FLOAT_DTYPES + COMPLEX_DTYPES


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

    Returns:
        h [..., L] in the dtype of b, or (h, last_state) with last_state [...] in float32
        (complex64; float64/complex128 for double inputs).

    Differentiable in a, b and initial_state, also through last_state.

    Raises:
        TypeError for a non-tensor argument, an unsupported dtype, dtypes of a and b that differ
        or an initial_state that is complex for real inputs (or real for complex ones);
        ValueError for shapes of a and b that differ, seqlen 0, an initial_state of the wrong
        shape, or tensors on different devices.

    Example:
        >>> a = torch.rand(2, 64, 1000)  # [B, D, L] decays
        >>> b = torch.randn(2, 64, 1000)
        >>> h, last = linear_scan(a, b, return_last_state=True)  # [B, D, L], [B, D]
    """
    check_tensor("a", a, dtypes=SCAN_DTYPES)
    check_device_supported("a", a)
    check_tensor("b", b, device=a.device)
    if b.dtype != a.dtype:
        raise TypeError(
            f"b: expected the dtype of a ({str(a.dtype).replace('torch.', '')}), "
            f"got {str(b.dtype).replace('torch.', '')}"
        )
    if a.dim() < 1:
        raise ValueError(f"a: expected at least 1 dim (..., seqlen), got shape {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"b: expected the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.shape[-1] < 1:
        raise ValueError(f"a: expected seqlen >= 1, got {a.shape[-1]}")
    if not isinstance(reverse, bool):
        raise TypeError(f"reverse: expected a bool, got {type(reverse).__name__}")
    if not isinstance(return_last_state, bool):
        raise TypeError(f"return_last_state: expected a bool, got {type(return_last_state).__name__}")
    if initial_state is not None:
        check_tensor("initial_state", initial_state, shape=tuple(a.shape[:-1]), device=a.device)
        if a.is_complex() != initial_state.is_complex() or not (
            initial_state.is_floating_point() or initial_state.is_complex()
        ):
            kind = "complex" if a.is_complex() else "real floating-point"
            raise TypeError(
                f"initial_state: expected a {kind} dtype like a's, got "
                f"{str(initial_state.dtype).replace('torch.', '')}"
            )
        initial_state = initial_state.to(_acc_dtype(a.dtype))
    h, last_state = torch.ops.ssm_kernels.linear_scan_fwd(a, b, initial_state, reverse)
    return (h, last_state) if return_last_state else h


@torch.library.register_fake("ssm_kernels::linear_scan_fwd")
def _(a, b, initial_state, reverse):
    return a.new_empty(a.shape), a.new_empty(a.shape[:-1], dtype=_acc_dtype(a.dtype))


@torch.library.register_fake("ssm_kernels::linear_scan_bwd")
def _(a, h, initial_state, dh, dlast_state, reverse):
    return a.new_empty(a.shape), a.new_empty(a.shape), a.new_empty(a.shape[:-1], dtype=_acc_dtype(a.dtype))


def _setup_context(ctx, inputs, output):
    a, b, initial_state, reverse = inputs
    h, _ = output
    ctx.save_for_backward(a, initial_state, h)
    ctx.reverse = reverse


def _backward(ctx, dh, dlast_state):
    a, initial_state, h = ctx.saved_tensors
    da, db, dinit = torch.ops.ssm_kernels.linear_scan_bwd(a, h, initial_state, dh, dlast_state, ctx.reverse)
    return da, db, (dinit if initial_state is not None else None), None


torch.library.register_autograd("ssm_kernels::linear_scan_fwd", _backward, setup_context=_setup_context)
