"""S4D's (log-)Vandermonde kernels (API.md: S4 / S4D: Cauchy and Vandermonde kernels)."""
from __future__ import annotations

import torch

from . import _op

_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def log_vandermonde(v: torch.Tensor, x: torch.Tensor, L: int, symmetric: bool = True) -> torch.Tensor:
    """S4D kernel: y_l = sum_n v_n exp(x_n l) for l = 0..L-1, without an [..., N, L] tensor.

    With ``symmetric`` the result is the real 2 Re(y) (the implicit conjugate half of an S4D
    state), else the complex y. Powers are formed by multiplication with periodic re-anchoring
    (exact exp(x l0) in double every 1024 positions), so complex64 stays within about 1e-6
    relative error for any L and |Im x| up to pi L.

    Args:
        v: [..., N] complex64/complex128 (e.g. C * B * (exp(dt A) - 1) / A).
        x: [..., N] in v's dtype (e.g. dt * A), broadcastable against v.
        L: the kernel length, >= 1.
        symmetric: return 2 Re(y) (float32/float64) instead of y.

    Returns:
        [..., L]: real of v's precision if symmetric, else v's dtype. Differentiable in v and x.

    Raises:
        TypeError: v or x not complex, dtypes that differ, L not an int.
        ValueError: L < 1, shapes that do not broadcast, devices that differ.

    Example:
        >>> x = torch.complex(-0.5 * torch.ones(64), torch.pi * torch.arange(64.0)) * 0.01
        >>> v = torch.randn(8, 64, dtype=torch.complex64)
        >>> k = log_vandermonde(v, x.to(torch.complex64), 1024)  # [8, 1024] float32
    """
    return _op.call("log_vandermonde_fwd", v=v, x=x, L=L, symmetric=symmetric)


def log_vandermonde_transpose(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """Transposed S4D product: out_n = sum_l u_l v_n exp(x_n l), without an [..., N, L] tensor.

    Args:
        u: [..., L] real or complex, of v's precision (float32/complex64 with complex64 v).
        v: [..., N] complex64/complex128.
        x: [..., N] in v's dtype.
        L: the length of u's last axis, >= 1.

    Returns:
        [..., N] in v's dtype (leading axes of u, v and x broadcast). Differentiable in u, v, x.

    Raises:
        TypeError: v or x not complex, u of another precision, L not an int.
        ValueError: L < 1, u's last axis not L, shapes that do not broadcast, devices that differ.

    Example:
        >>> x = torch.complex(-torch.rand(16), torch.randn(16))
        >>> out = log_vandermonde_transpose(torch.randn(4, 100), torch.randn(16, dtype=torch.cfloat), x.cfloat(), 100)
    """
    return _op.call("log_vandermonde_transpose_fwd", u=u, v=v, x=x, L=L)


def _batch(*shapes):
    return torch.broadcast_shapes(*(s[:-1] for s in shapes))


@_op.fake("log_vandermonde_fwd")
def _(v, x, L, symmetric):
    shape = torch.broadcast_shapes(v.shape, x.shape)
    dtype = _REAL_OF[v.dtype] if symmetric else v.dtype
    return v.new_empty((*shape[:-1], L), dtype=dtype)


@_op.fake("log_vandermonde_transpose_fwd")
def _(u, v, x, L):
    n = torch.broadcast_shapes(v.shape[-1:], x.shape[-1:])
    return v.new_empty((*_batch(u.shape, v.shape, x.shape), *n))


_op.register("log_vandermonde_fwd", "log_vandermonde_bwd")
_op.register("log_vandermonde_transpose_fwd", "log_vandermonde_transpose_bwd")
