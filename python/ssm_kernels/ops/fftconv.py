"""FFT long convolution for S4's convolutional mode, H3 and Hyena (API.md: fftconv)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _op

# The public activation names and the op's activation codes (csrc/fftconv/fftconv_op.cpp).
ACTIVATIONS = {None: 0, "gelu": 1, "silu": 2}


def fftconv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    k_rev: Optional[torch.Tensor] = None,
    pregate: Optional[torch.Tensor] = None,
    postgate: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
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
        cu_seqlens: [num_seqs + 1] int32/int64 offsets of packed sequences in the one row
            (batch 1): each sequence is convolved as if alone (its convolution starts at its first
            token; no tap, causal or anti-causal, crosses a sequence boundary). The row is run
            with a gap of min(K, L) - 1 (+ min(K_rev, L) - 1) zeros between sequences, so a
            kernel as long as the row costs about num_seqs times the FFT work of the row.

    Returns:
        out: [B, D, L] in u's dtype. Differentiable in u, k, D, k_rev, pregate and postgate.

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape or device, or an
        unknown activation; cu_seqlens not starting at 0, decreasing, not ending at seqlen, or
        with batch > 1.

    Example:
        >>> u = torch.randn(2, 64, 1000)
        >>> k = torch.randn(64, 1000) / 1000
        >>> y = fftconv(u, k, D=torch.randn(64), activation="gelu")
    """
    _op.check_choice("activation", activation, list(ACTIVATIONS))
    return _op.call("fftconv_fwd", u=u, k=k, D=D, k_rev=k_rev, pregate=pregate, postgate=postgate,
                    activation=ACTIVATIONS[activation], cu_seqlens=cu_seqlens)


@_op.fake("fftconv_fwd")
def _(u):
    return u.new_empty(u.shape)


_op.register("fftconv_fwd", "fftconv_bwd")
