"""S4's Cauchy kernel (API.md: S4 / S4D: Cauchy and Vandermonde kernels)."""
from __future__ import annotations

import torch

from . import _op


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
    return _op.call("cauchy_fwd", v=v, z=z, w=w, symmetric=symmetric)


@_op.fake("cauchy_fwd")
def _(v, z, w):
    shape = torch.broadcast_shapes(v.shape, w.shape)
    return v.new_empty((*shape[:-1], z.shape[0]))


_op.register("cauchy_fwd", "cauchy_bwd")
