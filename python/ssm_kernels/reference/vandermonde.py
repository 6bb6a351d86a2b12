"""Float64 loop-form references for the S4D (log-)Vandermonde kernels."""

import torch


def log_vandermonde(v, x, L, symmetric=True):
    """Vandermonde matrix-vector product with log-parametrised nodes, in complex128.

    Shapes:
        v, x: [..., N] complex, broadcastable against each other
        returns y: [..., L], float64 (symmetric) or complex128

    Math:
        y_l = sum_n v_n * exp(x_n * l),   l = 0..L-1
        symmetric: return the real 2 * Re(y) (the implicit conjugate half of an S4D state).

    Loops over n, evaluating exp(x_n * l) directly for every l (no repeated multiplication).
    Differentiable in v and x.

    Example:
        >>> x = torch.complex(-torch.rand(4), torch.rand(4)); v = torch.randn(4, dtype=torch.cfloat)
        >>> k = log_vandermonde(v, x, 16)  # [16] float64
    """
    v = v.to(torch.complex128)
    x = x.to(torch.complex128)
    v, x = torch.broadcast_tensors(v, x)  # [..., N]
    ell = torch.arange(L, dtype=torch.float64, device=v.device)  # [L]
    y = torch.zeros(*v.shape[:-1], L, dtype=torch.complex128, device=v.device)  # [..., L]
    for n in range(v.shape[-1]):
        y = y + v[..., n, None] * torch.exp(x[..., n, None] * ell)
    return 2 * y.real if symmetric else y


def log_vandermonde_transpose(u, v, x, L):
    """Transposed log-Vandermonde product, in complex128.

    Shapes:
        u: [..., L] real or complex
        v, x: [..., N] complex
        returns out: [..., N] complex128 (leading axes broadcast from u, v and x)

    Math:
        out_n = sum_{l<L} u_l * v_n * exp(x_n * l)

    Loops over n, evaluating exp(x_n * l) directly for every l. Differentiable in u, v and x.

    Example:
        >>> x = torch.complex(-torch.rand(4), torch.rand(4)); v = torch.randn(4, dtype=torch.cfloat)
        >>> out = log_vandermonde_transpose(torch.randn(16), v, x, 16)  # [4] complex128
    """
    u = u.to(torch.complex128)  # [..., L]
    v = v.to(torch.complex128)
    x = x.to(torch.complex128)
    v, x = torch.broadcast_tensors(v, x)  # [..., N]
    ell = torch.arange(L, dtype=torch.float64, device=v.device)  # [L]
    sums = [(u * torch.exp(x[..., n, None] * ell)).sum(-1) for n in range(x.shape[-1])]
    return torch.stack(sums, dim=-1) * v  # [..., N]
