"""Drop-in replacements for mamba_ssm functions, with mamba_ssm's names, signatures and
conventions:

    from ssm_kernels.compat.mamba_ssm import selective_scan_fn, selective_state_update
    from ssm_kernels.compat.mamba_ssm import mamba_chunk_scan_combined
    from ssm_kernels.compat.mamba_ssm import mamba3_siso_combined, mamba3_siso_step, mamba3_mimo
"""
from __future__ import annotations

import torch

from ..ops.mamba3 import mamba3_scan as _mamba3_scan
from ..ops.mamba3 import mamba3_step as _mamba3_step
from ..ops.selective_scan import selective_scan as _selective_scan
from ..ops.selective_scan import selective_state_update as _selective_state_update
from ._ssd import mamba_chunk_scan_combined

__all__ = [
    "selective_scan_fn",
    "selective_state_update",
    "mamba_chunk_scan_combined",
    "mamba3_siso_combined",
    "mamba3_siso_step",
    "mamba3_mimo",
]


def _deinterleave(t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's real layout of a complex variable B/C, [..., N, 2L] with (re, im) of step t at
    positions 2t and 2t + 1, as the complex tensor [..., N, L] (differentiable)."""
    if t.shape[-1] % 2 != 0:
        raise ValueError(f"B/C: expected an even last axis (2 * seqlen, real and imaginary parts), got {t.shape[-1]}")
    real = A.real.dtype
    pairs = t.to(real).reshape(*t.shape[:-1], t.shape[-1] // 2, 2).contiguous()
    return torch.view_as_complex(pairs)


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn on ssm_kernels.

    Same arguments and results as mamba_ssm: u, delta [B, D, L]; A [D, N] real or complex;
    B, C fixed [D, N], variable [B, N, L] or grouped [B, G, N, L]. For complex A, variable B/C are
    real tensors [B, (G,) N, 2L] holding (re, im) of each step interleaved along the last axis, as
    mamba_ssm expects; fixed B/C are complex [D, N]. Returns out, or (out, last_state) with the
    final state [B, D, N]. Unlike mamba_ssm, the gradient of last_state is propagated.

    Example:
        >>> out = selective_scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True)
    """
    if A.is_complex():
        if B.dim() >= 3:
            B = _deinterleave(B, A)
        if C.dim() >= 3:
            C = _deinterleave(C, A)
    return _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, None, return_last_state)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update on ssm_kernels.

    One decode step, updating ``state`` in place: [B, D, N] (x, dt, z [B, D]) or [B, H, P, N]
    (x, dt, z [B, H, P]); A [D, N] / [H, P, N] (stride-0 expanded views are fine); B, C [B, N] /
    [B, G, N]; D, dt_bias [D] / [H, P]; state_batch_indices [B] (negative = padding row, output
    zero). A state kept in float16/bfloat16, which mamba_ssm allows, is updated through a float32
    copy.

    Example:
        >>> out = selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)
    """
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if state.dtype == want:
        return _selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    work = state.to(want)
    out = _selective_state_update(work, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    state.copy_(work)
    return out


def mamba3_siso_combined(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None,
                         chunk_size=64, return_final_states=False, cu_seqlens=None):
    """mamba_ssm.ops.triton.mamba3.mamba3_siso_combined.mamba3_siso_combined on ssm_kernels.

    Q, K [B, L, G, N]; V, Z [B, L, H, P]; ADT, DT, Trap [B, H, L]; Q_bias, K_bias [H, N]; Angles
    [B, L, H, A]; D [H]; Input_States (angle, ssm, k, v) per sequence. With cu_seqlens (batch 1,
    sequences packed along L; mamba3_scan's cu_seqlens), each sequence starts from its own state
    (zeros or Input_States[i]) and the final states are per sequence.
    Returns out, or (out, angle, ssm, k, v) with return_final_states. Unlike mamba_ssm, headdim_qk
    and headdim_v need not be powers of two.

    Example:
        >>> out = mamba3_siso_combined(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z)
    """
    out, final = _mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, initial_states=Input_States,
                              chunk_size=chunk_size, return_final_states=True, cu_seqlens=cu_seqlens)
    return (out, *final) if return_final_states else out


def mamba3_siso_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D=None, Z=None, Input_States=None):
    """mamba_ssm.ops.triton.mamba3.mamba3_siso_step.mamba3_siso_step on ssm_kernels.

    One decode step: Q, K [B, G, N]; V, Z [B, H, P]; ADT, DT, Trap [B, H]; Angles [B, H, A];
    Input_States (angle [B, H, A], ssm [B, H, P, N], k [B, H, N], v [B, H, P]) (zeros if None).
    Returns (out [B, H, P], (angle, ssm, k, v)) as new tensors (the inputs are not modified);
    the states float32, v the step's V as mamba_ssm returns it.

    Example:
        >>> out, states = mamba3_siso_step(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, states)
    """
    batch, nheads, headdim_v = V.shape
    acc = torch.float64 if V.dtype == torch.float64 else torch.float32
    shapes = ((batch, nheads, Angles.shape[-1]), (batch, nheads, headdim_v, Q.shape[-1]),
              (batch, nheads, Q.shape[-1]), (batch, nheads, headdim_v))
    if Input_States is None:
        states = [torch.zeros(s, dtype=acc, device=V.device) for s in shapes]
    else:
        states = [t.to(acc).clone() for t in Input_States]
    out = _mamba3_step(*states, Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z)
    return out, (states[0], states[1], states[2], V)


def mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z, chunk_size,
                rotary_dim_divisor, dtype, return_state=False, cu_seqlens=None,
                fuse_pregate_headwise_rms_norm=False, outproj_norm_weight=None, outproj_norm_eps=1e-5):
    """mamba_ssm.ops.tilelang.mamba3.mamba3_mimo.mamba3_mimo on ssm_kernels.

    Q, K [B, L, R, G, N]; V, Z [B, L, H, P]; ADT, DT, Trap [B, H, L]; Q_bias, K_bias [H, R, N];
    MIMO_V, MIMO_Z, MIMO_Out [H, R, P]; Angles [B, L, H, N // rotary_dim_divisor]; D [H]. q, k,
    v, z are cast to `dtype`. Returns out [B, L, H, P] ([B, L, R, H, P], one output per rank,
    when MIMO_Out is None), or (out, angle, ssm, k, v) with return_state (k [B, H, R, N] rotated
    and biased, v [B, H, R, P] mixed; [S, ...] per packed sequence with cu_seqlens). The fused head-wise RMSNorm is not supported
    (NotImplementedError).

    Example:
        >>> out = mamba3_mimo(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, MIMO_V, MIMO_Z, MIMO_Out, Angles, D, Z,
        ...                   chunk_size=16, rotary_dim_divisor=4, dtype=torch.bfloat16)
    """
    if fuse_pregate_headwise_rms_norm:
        raise NotImplementedError("fuse_pregate_headwise_rms_norm: the fused head-wise RMSNorm is not supported")
    if Angles.shape[-1] != Q.shape[-1] // rotary_dim_divisor:
        raise ValueError(f"Angles: expected {Q.shape[-1] // rotary_dim_divisor} angles (headdim_qk / "
                         f"rotary_dim_divisor), got {Angles.shape[-1]}")
    Q, K, V = Q.to(dtype), K.to(dtype), V.to(dtype)
    Z = None if Z is None else Z.to(dtype)
    mimo_z = MIMO_Z if Z is not None else None

    def scan(out_weights):
        return _mamba3_scan(Q, K, V, ADT, DT, Trap, Q_bias, K_bias, Angles, D, Z, MIMO_V, mimo_z, out_weights,
                            chunk_size=chunk_size, return_final_states=True, cu_seqlens=cu_seqlens)

    if MIMO_Out is not None:
        out, final = scan(MIMO_Out)
    else:
        # one output per rank: the rank's one-hot output weights
        outs, final = [], None
        for r in range(Q.shape[2]):
            onehot = torch.zeros_like(MIMO_V)
            onehot[:, r] = 1.0
            out, final = scan(onehot)
            outs.append(out)
        out = torch.stack(outs, dim=2)
    return (out, *final) if return_state else out
