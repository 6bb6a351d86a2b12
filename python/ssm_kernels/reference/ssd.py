"""Float64 loop-form reference for the Mamba-2 SSD scan."""

import math

import torch
import torch.nn.functional as F


def ssd_scan(x, dt, A, B, C, chunk_size=256, D=None, z=None, dt_bias=None, dt_softplus=False,
             dt_limit=(0.0, float("inf")), initial_states=None, seq_idx=None,
             return_final_states=False):
    """Mamba-2 SSD scan as its per-step recurrence, in float64.

    Shapes:
        x, z: [B, L, H, P]
        dt: [B, L, H]
        A, dt_bias: [H]
        B, C: [B, L, G, N]; head h uses group h // (H // G)
        D: [H, P] or [H]
        initial_states: [B, H, P, N]
        seq_idx: [B, L] int, non-decreasing along L

    Math, per (b, h):
        dt_t = dt_t + dt_bias, then softplus(dt_t) if dt_softplus, then clamp to dt_limit
            (only when dt_limit != (0, inf), as mamba_ssm does)
        H_t = exp(dt_t * A[h]) * H_{t-1} + dt_t * outer(x_t, B_t),   H_0 = initial_states or 0
        y_t = (H_t @ C_t + D * x_t) * silu(z_t)   (each factor only when given)
        H is reset to zero before step t where seq_idx[b, t] != seq_idx[b, t-1].

    ``chunk_size`` is accepted for signature compatibility and ignored: the definition does not
    depend on it. Returns y [B, L, H, P] float64, and final_states = H_L [B, H, P, N] when
    return_final_states. Differentiable by autograd in every floating input.

    Example:
        >>> x = torch.randn(1, 8, 2, 4); dt = torch.rand(1, 8, 2); A = -torch.rand(2)
        >>> y = ssd_scan(x, dt, A, torch.randn(1, 8, 1, 3), torch.randn(1, 8, 1, 3))
    """
    x = x.to(torch.float64)  # [B, L, H, P]
    dt = dt.to(torch.float64)  # [B, L, H]
    A = A.to(torch.float64)  # [H]
    batch, seqlen, nheads, headdim = x.shape
    B = B.to(torch.float64).repeat_interleave(nheads // B.shape[2], dim=2)  # [B, L, H, N]
    C = C.to(torch.float64).repeat_interleave(nheads // C.shape[2], dim=2)  # [B, L, H, N]
    dstate = B.shape[-1]

    if dt_bias is not None:
        dt = dt + dt_bias.to(torch.float64)
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])

    if initial_states is None:
        h = torch.zeros(batch, nheads, headdim, dstate, dtype=torch.float64, device=x.device)
    else:
        h = initial_states.to(torch.float64)  # [B, H, P, N]

    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            reset = seq_idx[:, t] != seq_idx[:, t - 1]  # [B]
            h = torch.where(reset[:, None, None, None], torch.zeros_like(h), h)
        dt_t = dt[:, t]  # [B, H]
        decay = torch.exp(dt_t * A)[:, :, None, None]  # [B, H, 1, 1]
        drive = (dt_t[:, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]  # [B, H, P, N]
        h = decay * h + drive
        ys.append((h * C[:, t, :, None, :]).sum(-1))  # [B, H, P]
    y = torch.stack(ys, dim=1)  # [B, L, H, P]

    if D is not None:
        D = D.to(torch.float64)
        y = y + (D[:, None] if D.ndim == 1 else D) * x
    if z is not None:
        y = y * F.silu(z.to(torch.float64))
    return (y, h) if return_final_states else y
