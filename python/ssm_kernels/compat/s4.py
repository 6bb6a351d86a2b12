"""Drop-in replacements for the S4 repository's structured kernels (extensions/kernels and
src/models/functional): one import line switches.

    from ssm_kernels.compat.s4 import cauchy_mult, log_vandermonde, log_vandermonde_transpose

Conventions kept from there: v and w (or x) hold one half of each conjugate pair of an S4/S4D
state (N/2 entries); the other half is implicit, so cauchy_mult adds conj(v)/(z - conj(w)) and
log_vandermonde returns 2 Re(sum) by default. Unlike the original CUDA extension, any N (not only
powers of two up to 1024), any L, CPU tensors and complex128 are accepted.
"""
from __future__ import annotations

import torch

from ..ops.cauchy import cauchy
from ..ops.vandermonde import log_vandermonde as _log_vandermonde
from ..ops.vandermonde import log_vandermonde_transpose as _log_vandermonde_transpose

__all__ = ["cauchy_mult", "log_vandermonde", "log_vandermonde_transpose"]


def cauchy_mult(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_n v_n / (z_l - w_n) + conj(v_n) / (z_l - conj(w_n)) over the half state.

    Args:
        v, w: [..., N/2] complex (broadcastable); z: [L] complex.

    Returns:
        [..., L] complex. Differentiable in v and w; the gradients are those of the half state.

    Example:
        >>> y = cauchy_mult(torch.randn(8, 32, dtype=torch.cfloat), torch.exp(2j * torch.pi * torch.arange(64) / 64).cfloat(),
        ...                 torch.complex(-torch.rand(8, 32), torch.randn(8, 32)))
    """
    return cauchy(v, z, w, symmetric=True)


def log_vandermonde(v: torch.Tensor, x: torch.Tensor, L: int, conj: bool = True) -> torch.Tensor:
    """sum_n v_n exp(x_n l), l < L; 2 Re(.) over the half state when conj (the default).

    Args:
        v, x: [..., N] complex (broadcastable); L: int.

    Returns:
        [..., L]: real when conj, else complex.

    Example:
        >>> k = log_vandermonde(torch.randn(4, 16, dtype=torch.cfloat), -0.1 + 1j * torch.randn(4, 16).cfloat(), 256)
    """
    return _log_vandermonde(v, x, L, symmetric=conj)


def log_vandermonde_transpose(u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """out_n = sum_l u_l v_n exp(x_n l).

    Args:
        u: [..., L] real or complex; v, x: [..., N] complex; L: int.

    Returns:
        [..., N] complex.

    Example:
        >>> out = log_vandermonde_transpose(torch.randn(4, 256), torch.randn(4, 16, dtype=torch.cfloat),
        ...                                 -0.1 + 1j * torch.randn(4, 16).cfloat(), 256)
    """
    return _log_vandermonde_transpose(u, v, x, L)
