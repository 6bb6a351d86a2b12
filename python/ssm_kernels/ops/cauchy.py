"""S4's Cauchy kernel (API.md: S4 / S4D: Cauchy and Vandermonde kernels)."""
from __future__ import annotations

import torch

from ._checks import COMPLEX_DTYPES, check_device_supported, check_tensor


def broadcast_shape(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> tuple[int, ...]:
    """torch.broadcast_shapes with a message naming the arguments that do not broadcast."""
    try:
        return tuple(torch.broadcast_shapes(*(t.shape for t in tensors)))
    except RuntimeError:
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors))
        raise ValueError(f"{names[-1]}: shapes do not broadcast: {shapes}") from None


def check_same_dtype_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected the dtype of {ref_name} ({str(ref.dtype).replace('torch.', '')}), "
            f"got {str(t.dtype).replace('torch.', '')}"
        )
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {t.device}")


def cauchy(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """Cauchy matrix-vector product of S4 (DPLR kernel at the nodes z), without an [.., N, L] tensor.

    y[..., l] = sum_n v_n / (z_l - w_n)  (+ conj(v_n) / (z_l - conj(w_n)) when symmetric: the
    conjugate half of an S4 state is implicit, as in the S4 repository's cauchy_mult kernel).

    Args:
        v: [..., N] complex64/complex128.
        z: [L] complex, the dtype of v, L >= 1 (S4 uses roots of unity).
        w: [..., N] in v's dtype, broadcastable against v (the N axis broadcasts too).
        symmetric: add the conjugate terms.

    Returns:
        y: [..., L] in v's dtype; the leading axes are those of v and w broadcast.
        Differentiable in v and w (z gets no gradient).

    Raises:
        TypeError: v, z or w not complex, or dtypes that differ.
        ValueError: z not 1-D or empty, shapes of v and w that do not broadcast, devices that
            differ.

    Example:
        >>> v = torch.randn(4, 32, dtype=torch.complex64)
        >>> w = torch.complex(-torch.rand(32), torch.randn(32))
        >>> z = torch.exp(2j * torch.pi * torch.arange(64) / 64).to(torch.complex64)
        >>> y = cauchy(v, z, w)  # [4, 64]
    """
    check_tensor("v", v, dtypes=COMPLEX_DTYPES)
    check_device_supported("v", v)
    check_tensor("w", w, dtypes=COMPLEX_DTYPES)
    check_tensor("z", z, ndim=1, dtypes=COMPLEX_DTYPES)
    if v.dim() < 1:
        raise ValueError("v: expected at least 1 dim (..., N), got a 0-dim tensor")
    if w.dim() < 1:
        raise ValueError("w: expected at least 1 dim (..., N), got a 0-dim tensor")
    check_same_dtype_device("w", w, "v", v)
    check_same_dtype_device("z", z, "v", v)
    if z.shape[0] < 1:
        raise ValueError(f"z: expected L >= 1, got {z.shape[0]}")
    shape = broadcast_shape(("v", "w"), (v, w))
    if shape[-1] < 1:
        raise ValueError(f"w: expected N >= 1, got v {tuple(v.shape)} and w {tuple(w.shape)}")
    if not isinstance(symmetric, bool):
        raise TypeError(f"symmetric: expected a bool, got {type(symmetric).__name__}")
    return torch.ops.ssm_kernels.cauchy_fwd(v, z, w, symmetric)


@torch.library.register_fake("ssm_kernels::cauchy_fwd")
def _(v, z, w, symmetric):
    shape = torch.broadcast_shapes(v.shape, w.shape)
    return v.new_empty((*shape[:-1], z.shape[0]))


@torch.library.register_fake("ssm_kernels::cauchy_bwd")
def _(v, z, w, dout, symmetric):
    return v.new_empty(v.shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output):
    v, z, w, symmetric = inputs
    ctx.save_for_backward(v, z, w)
    ctx.symmetric = symmetric


def _backward(ctx, dout):
    v, z, w = ctx.saved_tensors
    dv, dw = torch.ops.ssm_kernels.cauchy_bwd(v, z, w, dout, ctx.symmetric)
    return dv, None, dw, None


torch.library.register_autograd("ssm_kernels::cauchy_fwd", _backward, setup_context=_setup_context)
