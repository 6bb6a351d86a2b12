"""Float64 loop-form reference for the Mamba-3 scan (SISO and MIMO) and its decode step.

Semantics of mamba_ssm's Mamba-3 (Lahoti et al. 2026, arXiv 2603.15569, Sec. 3: exponential-
trapezoidal discretisation, complex (rotary) state transitions, MIMO), as its step references
``mamba3_siso_step_ref`` (tests/ops/triton/test_mamba3_siso.py) and ``mamba3_MIMO_step_ref``
(tests/ops/tilelang/test_mamba3_mimo.py) define it.
"""

import math

import torch


def _rotate_pairs(x, angle):
    """Rotates the adjacent pairs (x[2j], x[2j+1]) of the last axis by angle[..., j]; pairs past
    angle's width are left alone. x [..., N], angle [..., A] broadcast against x[..., :A]."""
    A = angle.shape[-1]
    if A == 0:
        return x
    head = x[..., : 2 * A].unflatten(-1, (A, 2))
    x0, x1 = head[..., 0], head[..., 1]
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return torch.cat((rot, x[..., 2 * A:]), dim=-1)


def _expand_groups(t, H, axis):
    G = t.shape[axis]
    return t.repeat_interleave(H // G, dim=axis)


def mamba3_step(angle_state, ssm_state, k_state, v_state, q, k, v, adt, dt, trap, q_bias=None,
                k_bias=None, angles=None, D=None, z=None, mimo_v=None, mimo_z=None, mimo_o=None):
    """One Mamba-3 decode step in float64; returns (out, (angle, ssm, k, v) new states).

    Shapes (SISO / MIMO of rank R):
        angle_state [B, H, A]; ssm_state [B, H, P, N]; k_state [B, H, N] / [B, H, R, N];
        v_state [B, H, P] / [B, H, R, P]
        q, k [B, G, N] / [B, R, G, N]; v, z [B, H, P]; adt, dt, trap [B, H]; angles [B, H, A]
        q_bias, k_bias [H, N] / [H, R, N]; D [H]; mimo_v, mimo_z, mimo_o [H, R, P]

    Math, per (b, h):
        angle = (angle + pi tanh(angles) dt) mod 2 pi
        q_r = rot(q_r + q_bias_r, angle), k_r = rot(k_r + k_bias_r, angle), v_r = v * mimo_v_r
        S = exp(adt) S + (1 - sigmoid(trap)) dt exp(adt) sum_r v_state_r k_state_r^T
              + sigmoid(trap) dt sum_r v_r k_r^T
        y_r = (S q_r + D v_r) * silu(z * mimo_z_r);  out = sum_r mimo_o_r * y_r  (SISO: out = y)
        new k_state, v_state = (k_r), (v_r)
    """
    f = torch.float64
    mimo = mimo_v is not None
    if not mimo:
        q, k, k_state, v_state = q.unsqueeze(1), k.unsqueeze(1), k_state.unsqueeze(2), v_state.unsqueeze(2)
        q_bias = None if q_bias is None else q_bias.unsqueeze(1)
        k_bias = None if k_bias is None else k_bias.unsqueeze(1)
    H = v.shape[1]
    q = _expand_groups(q.to(f), H, 2).transpose(1, 2)  # [B, H, R, N]
    k = _expand_groups(k.to(f), H, 2).transpose(1, 2)
    if q_bias is not None:
        q = q + q_bias.to(f)
    if k_bias is not None:
        k = k + k_bias.to(f)
    v = v.to(f)
    vr = v.unsqueeze(2) * mimo_v.to(f) if mimo else v.unsqueeze(2)  # [B, H, R, P]
    adt, dt, lam = adt.to(f), dt.to(f), torch.sigmoid(trap.to(f))
    angle = angle_state.to(f)
    if angles is not None:
        angle = angle + math.pi * torch.tanh(angles.to(f)) * dt.unsqueeze(-1)
        angle = torch.remainder(angle, 2 * math.pi)
    q = _rotate_pairs(q, angle.unsqueeze(2))
    k = _rotate_pairs(k, angle.unsqueeze(2))
    alpha = torch.exp(adt)
    beta = (1 - lam) * dt * alpha
    gamma = lam * dt
    S = ssm_state.to(f)
    prev = torch.einsum("bhrp,bhrn->bhpn", v_state.to(f), k_state.to(f))
    cur = torch.einsum("bhrp,bhrn->bhpn", vr, k)
    S = alpha[..., None, None] * S + beta[..., None, None] * prev + gamma[..., None, None] * cur
    y = torch.einsum("bhpn,bhrn->bhrp", S, q)
    if D is not None:
        y = y + D.to(f)[None, :, None, None] * vr
    if z is not None:
        zr = z.to(f).unsqueeze(2) * (mimo_z.to(f) if mimo else 1.0)
        y = y * zr * torch.sigmoid(zr)
    out = (y * mimo_o.to(f)).sum(2) if mimo else y.squeeze(2)
    if not mimo:
        k, vr = k.squeeze(2), vr.squeeze(2)
    return out, (angle, S, k, vr)


def mamba3_scan(q, k, v, adt, dt, trap, q_bias=None, k_bias=None, angles=None, D=None, z=None,
                mimo_v=None, mimo_z=None, mimo_o=None, initial_states=None, chunk_size=64,
                return_final_states=False, cu_seqlens=None):
    """Mamba-3 scan as its per-step recurrence, in float64.

    Shapes (SISO / MIMO of rank R; G query/key heads dividing H value heads, head h uses group
    h // (H // G)):
        q, k: [B, L, G, N] / [B, L, R, G, N]
        v, z: [B, L, H, P]
        adt, dt, trap: [B, H, L]
        angles: [B, L, H, A] with 2 A <= N (rotates the first 2 A entries of q and k)
        q_bias, k_bias: [H, N] / [H, R, N];  D: [H];  mimo_v, mimo_z, mimo_o: [H, R, P]
        initial_states: (angle [B, H, A], ssm [B, H, P, N], k [B, H, N] / [B, H, R, N],
            v [B, H, P] / [B, H, R, P]), any entry None for zeros

    Math: ``mamba3_step`` applied for t = 0 .. L-1 from the initial states. ``chunk_size`` is
    accepted for signature compatibility and ignored. Returns out [B, L, H, P] float64, and the
    final states (angle, ssm, k, v) when return_final_states. Differentiable by autograd.

    cu_seqlens [S + 1] (batch 1): each packed sequence cu_seqlens[s] .. cu_seqlens[s + 1] - 1 runs
    alone from initial state row s (states [S, H, ...]); an empty one's final states are its
    initial states.
    """
    if cu_seqlens is None:
        out, states = _scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                            initial_states)
        return (out, states) if return_final_states else out
    offsets = [int(o) for o in cu_seqlens.tolist()]
    init = tuple(initial_states) if initial_states is not None else (None,) * 4
    outs, finals = [], []
    for s in range(len(offsets) - 1):
        a, b = offsets[s], offsets[s + 1]
        row = tuple(None if t is None else t[s:s + 1] for t in init)
        seq = [None if t is None else t[:, a:b] for t in (q, k, v, angles, z)]
        coef = [t[:, :, a:b] for t in (adt, dt, trap)]
        out, states = _scan(*seq[:3], *coef, q_bias, k_bias, seq[3], D, seq[4], mimo_v, mimo_z, mimo_o, row)
        outs.append(out)
        finals.append(states)
    out = torch.cat(outs, dim=1)
    states = tuple(torch.cat(rows) for rows in zip(*finals))
    return (out, states) if return_final_states else out


def _scan(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, initial_states):
    """mamba3_scan without cu_seqlens: (out, final states); L may be 0."""
    f = torch.float64
    mimo = mimo_v is not None
    Bn, L, H, P = v.shape
    N = q.shape[-1]
    R = q.shape[2] if mimo else 1
    A = angles.shape[-1] if angles is not None else 0
    init = tuple(initial_states) if initial_states is not None else (None,) * 4
    kshape = (Bn, H, R, N) if mimo else (Bn, H, N)
    vshape = (Bn, H, R, P) if mimo else (Bn, H, P)
    defaults = ((Bn, H, A), (Bn, H, P, N), kshape, vshape)
    states = tuple(torch.zeros(s, dtype=f, device=v.device) if t is None else t.to(f) for t, s in zip(init, defaults))
    outs = []
    for t in range(L):
        out, states = mamba3_step(
            *states, q[:, t], k[:, t], v[:, t], adt[:, :, t], dt[:, :, t], trap[:, :, t], q_bias, k_bias,
            None if angles is None else angles[:, t], D, None if z is None else z[:, t], mimo_v, mimo_z, mimo_o,
        )
        outs.append(out)
    out = torch.stack(outs, dim=1) if outs else v.new_zeros((Bn, 0, H, P), dtype=f)
    return out, states
