"""Float64 loop-form reference for the S4 Cauchy kernel."""

import torch


def cauchy(v, z, w, symmetric=True):
    """Cauchy matrix-vector product of S4, in complex128.

    Shapes:
        v, w: [..., N] complex, broadcastable against each other
        z: [L] complex
        returns y: [..., L] complex128 (leading axes broadcast from v and w)

    Math:
        y[..., l] = sum_n v_n / (z_l - w_n)
                    + conj(v_n) / (z_l - conj(w_n))   (the second term only if symmetric)

    The sum loops over n so that no [..., N, L] tensor is formed. Differentiable in v, w and z.

    Example:
        >>> v = torch.randn(3, 8, dtype=torch.complex64); w = torch.randn(8, dtype=torch.complex64)
        >>> y = cauchy(v, torch.randn(16, dtype=torch.complex64), w)  # [3, 16]
    """
    v = v.to(torch.complex128)
    w = w.to(torch.complex128)
    z = z.to(torch.complex128)  # [L]
    v, w = torch.broadcast_tensors(v, w)  # [..., N]
    y = torch.zeros(*v.shape[:-1], z.shape[0], dtype=torch.complex128, device=v.device)  # [..., L]
    for n in range(v.shape[-1]):
        v_n = v[..., n, None]  # [..., 1]
        w_n = w[..., n, None]
        y = y + v_n / (z - w_n)
        if symmetric:
            y = y + v_n.conj() / (z - w_n.conj())
    return y
