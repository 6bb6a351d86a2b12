"""Float64 direct-sum reference for the FFT long convolution."""

import torch
import torch.nn.functional as F


def fftconv(u, k, D=None, k_rev=None, pregate=None, postgate=None, activation=None):
    """Long causal (and optionally anti-causal) depthwise convolution, as a direct sum in float64.

    Shapes:
        u, pregate, postgate: [B, D, L]
        k, k_rev: [D, K] (K >= 1; taps past L are unused)
        D: [D]
        returns out: [B, D, L] float64

    Math:
        v = u * pregate
        c[t] = sum_{s=0}^{min(t, K-1)} k[s] * v[t-s]
        c[t] += sum_{s=0}^{K_rev-1} k_rev[s] * v[t+s]        (when k_rev is given; lag 0 included)
        out = act(c + D * v) * postgate
    Each factor only when given; act: None, "gelu" (exact erf form) or "silu"; anything else
    raises ValueError.

    The sum loops over the taps (no FFT). Differentiable in every floating input.

    Example:
        >>> out = fftconv(torch.randn(2, 4, 32), torch.randn(4, 32), D=torch.randn(4))
    """
    if activation not in (None, "gelu", "silu"):
        raise ValueError(f"activation must be None, 'gelu' or 'silu', got {activation!r}")
    v = u.to(torch.float64)  # [B, D, L]
    if pregate is not None:
        v = v * pregate.to(torch.float64)
    seqlen = v.shape[-1]

    c = torch.zeros_like(v)  # [B, D, L]
    k = k.to(torch.float64)  # [D, K]
    for s in range(min(k.shape[-1], seqlen)):
        c = c + F.pad(k[:, s, None] * v[..., :seqlen - s], (s, 0))
    if k_rev is not None:
        k_rev = k_rev.to(torch.float64)  # [D, K_rev]
        for s in range(min(k_rev.shape[-1], seqlen)):
            c = c + F.pad(k_rev[:, s, None] * v[..., s:], (0, s))

    if D is not None:
        c = c + D.to(torch.float64)[:, None] * v
    if activation == "gelu":
        c = F.gelu(c)
    elif activation == "silu":
        c = F.silu(c)
    if postgate is not None:
        c = c * postgate.to(torch.float64)
    return c
