"""FFT long convolution for S4's convolutional mode, H3 and Hyena (API.md: fftconv)."""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import FLOAT_DTYPES, check_choice, check_device_supported, check_tensor

ACTIVATIONS = {None: 0, "gelu": 1, "silu": 2}


def _check_param(name, t, dim, u, *, ndim):
    check_tensor(name, t, ndim=ndim, device=u.device)
    allowed = (torch.float32, torch.float64) if u.dtype == torch.float64 else (torch.float32,)
    if t.dtype not in allowed:
        want = "float32 (or float64 with a float64 u)"
        raise TypeError(f"{name}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if t.shape[0] != dim or (ndim == 2 and t.shape[1] < 1):
        want = f"(dim={dim}, klen >= 1)" if ndim == 2 else f"(dim={dim},)"
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def _check_gate(name, t, u):
    if t is None:
        return
    check_tensor(name, t, shape=tuple(u.shape), device=u.device)
    if t.dtype != u.dtype:
        raise TypeError(
            f"{name}: expected the dtype of u ({str(u.dtype).replace('torch.', '')}), "
            f"got {str(t.dtype).replace('torch.', '')}"
        )


def fftconv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    k_rev: Optional[torch.Tensor] = None,
    pregate: Optional[torch.Tensor] = None,
    postgate: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> torch.Tensor:
    """Long depthwise convolution through FFTs, with fused skip, gates and activation.

    v = u * pregate
    c[t] = sum_{s=0}^{min(t, K-1)} k[s] v[t-s]   (+ sum_{s<K_rev} k_rev[s] v[t+s] with k_rev)
    out = act(c + D v) * postgate

    Each factor applies only when given. A kernel longer than the sequence uses its first seqlen
    taps. FFT arithmetic is float32 (float64 for float64 inputs), on a zero-padded length of the
    form 2^a 3^b 5^c; the kernel's spectrum is computed once per call and shared by the batch.

    Args:
        u: [B, D, L] float32/float16/bfloat16 (float64 accepted), any strides; L >= 1.
        k: [D, K] float32 (float64 allowed with a float64 u), K >= 1: causal taps, k[0] at lag 0.
        D: [D] skip weight (same dtype rule as k), or None.
        k_rev: [D, K_rev] anti-causal taps (k_rev[0] at lag 0), or None.
        pregate, postgate: [B, D, L] in u's dtype, any strides, or None.
        activation: None, "gelu" (exact, erf form) or "silu".

    Returns:
        out: [B, D, L] in u's dtype. Differentiable in u, k, D, k_rev, pregate and postgate.

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape or device, or an
        unknown activation.

    Example:
        >>> u = torch.randn(2, 64, 1000)
        >>> k = torch.randn(64, 1000) / 1000
        >>> y = fftconv(u, k, D=torch.randn(64), activation="gelu")
    """
    check_tensor("u", u, ndim=3, dtypes=FLOAT_DTYPES)
    check_device_supported("u", u)
    dim, seqlen = u.shape[1], u.shape[2]
    if seqlen < 1:
        raise ValueError(f"u: expected seqlen >= 1, got {seqlen}")
    _check_param("k", k, dim, u, ndim=2)
    if D is not None:
        _check_param("D", D, dim, u, ndim=1)
    if k_rev is not None:
        _check_param("k_rev", k_rev, dim, u, ndim=2)
    _check_gate("pregate", pregate, u)
    _check_gate("postgate", postgate, u)
    check_choice("activation", activation, list(ACTIVATIONS))
    return torch.ops.ssm_kernels.fftconv_fwd(u, k, D, k_rev, pregate, postgate, ACTIVATIONS[activation])


@torch.library.register_fake("ssm_kernels::fftconv_fwd")
def _(u, k, D, k_rev, pregate, postgate, activation):
    return u.new_empty(u.shape)


@torch.library.register_fake("ssm_kernels::fftconv_bwd")
def _(dout, u, k, D, k_rev, pregate, postgate, activation):
    def like(t, ref, empty_dtype):
        return ref.new_empty(ref.shape) if t is not None else u.new_empty((0,), dtype=empty_dtype)

    return (
        u.new_empty(u.shape),
        k.new_empty(k.shape),
        like(D, D, k.dtype),
        like(k_rev, k_rev, k.dtype),
        like(pregate, u, u.dtype),
        like(postgate, u, u.dtype),
    )


def _setup_context(ctx, inputs, output):
    u, k, D, k_rev, pregate, postgate, activation = inputs
    ctx.save_for_backward(u, k, D, k_rev, pregate, postgate)
    ctx.activation = activation


def _backward(ctx, dout):
    u, k, D, k_rev, pregate, postgate = ctx.saved_tensors
    du, dk, dD, dk_rev, dpregate, dpostgate = torch.ops.ssm_kernels.fftconv_bwd(
        dout, u, k, D, k_rev, pregate, postgate, ctx.activation
    )
    return (
        du,
        dk,
        dD if D is not None else None,
        dk_rev if k_rev is not None else None,
        dpregate if pregate is not None else None,
        dpostgate if postgate is not None else None,
        None,
    )


torch.library.register_autograd("ssm_kernels::fftconv_fwd", _backward, setup_context=_setup_context)
