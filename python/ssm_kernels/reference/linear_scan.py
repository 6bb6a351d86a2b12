"""Float64 loop-form reference for the diagonal linear recurrence."""

import torch


def linear_scan(a, b, initial_state=None, reverse=False, return_last_state=False):
    """Diagonal linear recurrence over the last axis, in float64 (complex128 if complex).

    Shapes:
        a, b: [..., L] real or complex
        initial_state: [...]
        returns h: [..., L], and last_state: [...] when return_last_state

    Math:
        forward: h_t = a_t * h_{t-1} + b_t, h_{-1} = initial_state (zeros if None);
                 last_state = h_{L-1}
        reverse: h_t = a_t * h_{t+1} + b_t, h_L = initial_state (zeros if None);
                 last_state = h_0

    Differentiable in a, b and initial_state, including through last_state.

    Example:
        >>> h = linear_scan(torch.rand(3, 16), torch.randn(3, 16))  # [3, 16]
    """
    dtype = torch.complex128 if (a.is_complex() or b.is_complex()) else torch.float64
    a = a.to(dtype)  # [..., L]
    b = b.to(dtype)  # [..., L]
    if initial_state is None:
        h = torch.zeros(a.shape[:-1], dtype=dtype, device=a.device)  # [...]
    else:
        h = initial_state.to(dtype)  # [...]
    seqlen = a.shape[-1]
    steps = range(seqlen - 1, -1, -1) if reverse else range(seqlen)
    hs = [None] * seqlen
    for t in steps:
        h = a[..., t] * h + b[..., t]
        hs[t] = h
    out = torch.stack(hs, dim=-1)  # [..., L]
    return (out, h) if return_last_state else out
