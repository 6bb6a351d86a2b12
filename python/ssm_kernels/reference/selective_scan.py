"""Float64 loop-form references for the Mamba-1 selective scan and its decode step."""

import torch
import torch.nn.functional as F

from ._state_rows import gather_state_rows, scatter_state_rows


def _as_real(t):
    return None if t is None else t.to(torch.float64)


def _as_state(t, is_complex):
    return t.to(torch.complex128 if is_complex else torch.float64)


def _expand_bc(t, dim, is_complex):
    """Bring B or C to a per-channel, per-step form: [D, N] (fixed) or [B, D, N, L] (variable)."""
    t = _as_state(t, is_complex)
    if t.ndim == 2:
        return t  # [D, N]
    if t.ndim == 3:
        return t.unsqueeze(1)  # [B, 1, N, L]
    groups = t.shape[1]
    return t.repeat_interleave(dim // groups, dim=1)  # [B, D, N, L]


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   initial_state=None, return_last_state=False):
    """Mamba-1 selective scan, evaluated step by step in float64 (complex128 for complex A).

    Shapes:
        u, delta, z: [B, D, L]
        A: [D, N] real or complex
        B, C: each fixed [D, N], variable [B, N, L] or grouped [B, G, N, L] (detected by ndim);
            channel d uses group d // (D // G)
        D, delta_bias: [D]
        initial_state: [B, D, N]

    Math, per (b, d, n):
        dt_t = delta_t + delta_bias, then softplus(dt_t) if delta_softplus
        h_t = exp(dt_t * A[d, n]) * h_{t-1} + dt_t * B_t[n] * u_t,   h_0 = initial_state or 0
        y_t = sum_n C_t[n] * h_t[n]         (2 * Re(...) for complex A)
        out_t = (y_t + D[d] * u_t) * silu(z_t)   (each factor only when given)

    Returns out [B, D, L] float64, and last_state = h_L [B, D, N] (float64 or complex128) when
    return_last_state. Differentiable by autograd in every floating input.

    Example:
        >>> u = torch.randn(2, 4, 8); delta = torch.rand(2, 4, 8); A = -torch.rand(4, 3)
        >>> out = selective_scan(u, delta, A, torch.randn(4, 3), torch.randn(4, 3))
    """
    is_complex = A.is_complex()
    u = _as_real(u)  # [B, D, L]
    delta = _as_real(delta)  # [B, D, L]
    A = _as_state(A, is_complex)  # [D, N]
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    B = _expand_bc(B, dim, is_complex)
    C = _expand_bc(C, dim, is_complex)

    if delta_bias is not None:
        delta = delta + _as_real(delta_bias)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)

    if initial_state is None:
        h = torch.zeros(batch, dim, dstate, dtype=A.dtype, device=u.device)  # [B, D, N]
    else:
        h = _as_state(initial_state, is_complex)  # [B, D, N]

    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]  # [B, D, 1]
        B_t = B if B.ndim == 2 else B[..., t]  # [D, N] or [B, D|1, N]
        C_t = C if C.ndim == 2 else C[..., t]
        h = torch.exp(dt * A) * h + dt * B_t * u[:, :, t, None]  # [B, D, N]
        y = (C_t * h).sum(-1)  # [B, D]
        ys.append(2 * y.real if is_complex else y)
    out = torch.stack(ys, dim=-1)  # [B, D, L]

    if D is not None:
        out = out + _as_real(D)[:, None] * u
    if z is not None:
        out = out * F.silu(_as_real(z))
    return (out, h) if return_last_state else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """One selective-scan decode step in float64; updates ``state`` in place.

    Layouts:
        no heads: state [B_state, D, N]; x, dt, z [B, D]; A [D, N]; B, C [B, N]; D, dt_bias [D]
        heads:    state [B_state, H, P, N]; x, dt, z [B, H, P]; A [H, P, N]; B, C [B, G, N],
                  head h uses group h // (H // G); D, dt_bias [H, P]
        state_batch_indices: [B] int; row i reads and writes state[state_batch_indices[i]]
            (row i when None); a negative index leaves the state untouched and gives zeros.

    Math:
        dt = dt + dt_bias, then softplus(dt) if dt_softplus
        h = exp(dt * A) * h + dt * B * x
        out = (sum_n C * h + D * x) * silu(z)   (each factor only when given)

    The new state is computed in float64 and copied back into ``state`` in its own dtype.
    Returns out (shape of x) in float64. Differentiable in every input except ``state`` (which
    is overwritten).

    Example:
        >>> state = torch.zeros(2, 4, 3)
        >>> out = selective_state_update(state, torch.randn(2, 4), torch.rand(2, 4),
        ...                              -torch.rand(4, 3), torch.randn(2, 3), torch.randn(2, 3))
    """
    if state.ndim == 3:
        out = selective_state_update(
            state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0), B.unsqueeze(1),
            C.unsqueeze(1), None if D is None else D.unsqueeze(0),
            None if z is None else z.unsqueeze(1),
            None if dt_bias is None else dt_bias.unsqueeze(0),
            dt_softplus, state_batch_indices)
        return out.squeeze(1)

    x = _as_real(x)  # [B, H, P]
    dt = _as_real(dt)  # [B, H, P]
    A = _as_real(A)  # [H, P, N]
    batch, nheads = x.shape[:2]
    B = _as_real(B).repeat_interleave(nheads // B.shape[1], dim=1)  # [B, H, N]
    C = _as_real(C).repeat_interleave(nheads // C.shape[1], dim=1)  # [B, H, N]

    rows, valid, h = gather_state_rows(state, state_batch_indices, batch, x.device)  # h [B, H, P, N]

    if dt_bias is not None:
        dt = dt + _as_real(dt_bias)
    if dt_softplus:
        dt = F.softplus(dt)
    h = torch.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B[:, :, None, :]  # [B, H, P, N]
    out = (h * C[:, :, None, :]).sum(-1)  # [B, H, P]
    if D is not None:
        out = out + _as_real(D) * x
    if z is not None:
        out = out * F.silu(_as_real(z))
    out = torch.where(valid[:, None, None], out, torch.zeros_like(out))

    scatter_state_rows(state, rows, h)
    return out
