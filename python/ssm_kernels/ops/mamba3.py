"""Mamba-3 scan (SISO and MIMO) and its decode step (API.md: Mamba-3)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _op

DEFAULT_CHUNK_SIZE = 64


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _initial(initial_states) -> tuple:
    if initial_states is None:
        return (None, None, None, None)
    if not isinstance(initial_states, (tuple, list)) or len(initial_states) != 4:
        raise TypeError("initial_states: expected None or a tuple (angle, ssm, k, v) of tensors or None, got "
                        f"{type(initial_states).__name__}")
    return tuple(initial_states)


def mamba3_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    adt: torch.Tensor,
    dt: torch.Tensor,
    trap: torch.Tensor,
    q_bias: Optional[torch.Tensor] = None,
    k_bias: Optional[torch.Tensor] = None,
    angles: Optional[torch.Tensor] = None,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    mimo_v: Optional[torch.Tensor] = None,
    mimo_z: Optional[torch.Tensor] = None,
    mimo_o: Optional[torch.Tensor] = None,
    initial_states: Optional[Sequence[Optional[torch.Tensor]]] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_final_states: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Mamba-3 scan: exponential-trapezoidal SSM with data-dependent rotary state (SISO), or its
    multi-input multi-output form of rank R (MIMO, when mimo_v is given); mamba_ssm's semantics.

    Per (batch, value head h), state S [P, N] in float32, lambda_t = sigmoid(trap_t):
        angle_t = (angle_{t-1} + pi tanh(angles_t) dt_t) mod 2 pi
        q_t, k_t = rot(q_t + q_bias, angle_t), rot(k_t + k_bias, angle_t)  (adjacent pairs, the
            first 2 A entries; one rotation per rank)
        S_t = e^{adt_t} S_{t-1} + (1 - lambda_t) dt_t e^{adt_t} v_{t-1} k_{t-1}^T + lambda_t dt_t v_t k_t^T
        y_t = (S_t q_t + D v_t) * silu(z_t)
    MIMO: v_{t,r} = v_t * mimo_v[h, r], z_{t,r} = z_t * mimo_z[h, r], the state adds
    sum_r v_{t,r} k_{t,r}^T, y_{t,r} = (S_t q_{t,r} + D v_{t,r}) silu(z_{t,r}) and
    out_t = sum_r mimo_o[h, r] * y_{t,r}. Computed chunk by chunk (chunk_size steps): the
    masked intra-chunk products plus the state passed between chunks (docs/mamba3.md).

    Args:
        q, k: [B, L, G, N] (SISO) or [B, L, R, G, N] (MIMO): G query/key heads dividing the H
            value heads (head h uses group h // (H // G)); N even. float32/float16/bfloat16
            (float64 accepted), the dtype of v.
        v: [B, L, H, P]; z: [B, L, H, P] or None (no gate). Any strides.
        adt, dt, trap: [B, H, L], any float dtype: log-decay (A dt), step size, and the
            trapezoid mix before its sigmoid.
        q_bias, k_bias: [H, N] (MIMO: [H, R, N]) or None. angles: [B, L, H, A] with 2 A <= N,
            or None (no rotation). D: [H] or None.
        mimo_v, mimo_o: [H, R, P] (MIMO); mimo_z: [H, R, P], required with z in MIMO.
        initial_states: None or (angle [B, H, A], ssm [B, H, P, N], k [B, H, N] / [B, H, R, N],
            v [B, H, P] / [B, H, R, P]), each None for zeros: the final states of a previous call
            (k rotated and biased, v mixed).
        chunk_size: 1 .. 256; the result does not depend on it beyond rounding.
        return_final_states: also return the final (angle, ssm, k, v), float32 (float64 for
            float64 inputs).
        cu_seqlens: [S + 1] int32/int64 offsets of S packed sequences in the one row (batch 1),
            on v's device: sequence s is tokens cu_seqlens[s] .. cu_seqlens[s + 1] - 1 and runs
            as if alone (its first token's trapezoid term sees its own initial k, v state, not the
            previous sequence's last token). initial_states and the final states then have S rows
            instead of B ([S, H, ...]); an empty sequence's final states are its initial states.

    Returns:
        out [B, L, H, P] in v's dtype, or (out, (angle, ssm, k, v)).

    Differentiable in every tensor argument, including initial_states, also through the final
    states.

    Raises:
        TypeError for a non-tensor or wrongly typed argument or a dtype mismatch (cu_seqlens not
        int32/int64); ValueError for a shape that does not fit (mismatched heads or head dims, too
        many rotary pairs, an odd headdim_qk, wrong state shapes or state count, a missing mixing
        weight), tensors on different devices, or cu_seqlens with batch > 1, not starting at 0,
        decreasing or not ending at seqlen (its content is checked for CPU tensors only: reading
        CUDA values would synchronise; bad content there gives unspecified values, never an
        out-of-bounds access).

    Example:
        >>> B, L, H, G, N, P = 1, 100, 4, 1, 32, 16
        >>> q, k = torch.randn(B, L, G, N), torch.randn(B, L, G, N)
        >>> v = torch.randn(B, L, H, P)
        >>> dt = torch.rand(B, H, L) * 0.1
        >>> out = mamba3_scan(q, k, v, -dt, dt, torch.randn(B, H, L), angles=torch.randn(B, L, H, 8))
    """
    if not isinstance(return_final_states, bool):
        raise TypeError(f"return_final_states: expected a bool, got {type(return_final_states).__name__}")
    ia, iss, ik, iv = _initial(initial_states)
    tensors = (q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o, ia, iss, ik, iv)
    # The CPU forward keeps its chunk states and y before the gate only for a backward to come.
    save = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    out, fa, fs, fk, fv, _, _ = _op.call(
        "mamba3_scan_fwd", q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles,
        D=D, z=z, mimo_v=mimo_v, mimo_z=mimo_z, mimo_o=mimo_o, initial_angle=ia, initial_ssm=iss, initial_k=ik,
        initial_v=iv, chunk_size=chunk_size, save_for_backward=save, cu_seqlens=cu_seqlens,
    )
    return (out, (fa, fs, fk, fv)) if return_final_states else out


def mamba3_step(
    angle_state: torch.Tensor,
    ssm_state: torch.Tensor,
    k_state: torch.Tensor,
    v_state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    adt: torch.Tensor,
    dt: torch.Tensor,
    trap: torch.Tensor,
    q_bias: Optional[torch.Tensor] = None,
    k_bias: Optional[torch.Tensor] = None,
    angles: Optional[torch.Tensor] = None,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    mimo_v: Optional[torch.Tensor] = None,
    mimo_z: Optional[torch.Tensor] = None,
    mimo_o: Optional[torch.Tensor] = None,
    state_batch_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One Mamba-3 decode step (the recurrence of mamba3_scan for one position); updates the four
    states in place (not differentiable).

    Layouts (as mamba3_scan without the L axis):
        angle_state [Bs, H, A]; ssm_state [Bs, H, P, N]; k_state [Bs, H, N] (MIMO [Bs, H, R, N]);
        v_state [Bs, H, P] (MIMO [Bs, H, R, P]): float32 (float64 for float64 v), any strides.
        q, k [B, G, N] (MIMO [B, R, G, N]); v, z [B, H, P]; adt, dt, trap [B, H];
        angles [B, H, A]; q_bias, k_bias, D, mimo_* as in mamba3_scan.
    state_batch_indices: [B] int32/int64: row i updates state row state_batch_indices[i]; a
    negative index leaves the states alone and outputs zeros (on CPU an index >= Bs raises; on
    CUDA it acts like a negative one). Without it Bs must equal B.

    Returns:
        out [B, H, P] in v's dtype.

    Raises:
        TypeError/ValueError naming the argument for a wrong shape, dtype or device.

    Example:
        >>> B, H, N, P, A = 2, 4, 16, 8, 4
        >>> states = (torch.zeros(B, H, A), torch.zeros(B, H, P, N), torch.zeros(B, H, N), torch.zeros(B, H, P))
        >>> dt = torch.rand(B, H)
        >>> out = mamba3_step(*states, torch.randn(B, 1, N), torch.randn(B, 1, N), torch.randn(B, H, P),
        ...                   -dt, dt, torch.randn(B, H), angles=torch.randn(B, H, A))
    """
    return _op.call(
        "mamba3_step", angle_state=angle_state, ssm_state=ssm_state, k_state=k_state, v_state=v_state, q=q, k=k,
        v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles, D=D, z=z, mimo_v=mimo_v,
        mimo_z=mimo_z, mimo_o=mimo_o, state_batch_indices=state_batch_indices,
    )


@_op.fake("mamba3_scan_fwd")
def _(q, v, angles, mimo_v, chunk_size, save_for_backward, cu_seqlens):
    B, L, H, P = v.shape
    Bs = B if cu_seqlens is None else cu_seqlens.shape[0] - 1  # state rows: one per sequence
    N = q.shape[-1]
    A = angles.shape[-1] if angles is not None else 0
    acc = _acc_dtype(v.dtype)
    R = q.shape[2] if mimo_v is not None else 1
    if mimo_v is not None:
        ks, vs = (Bs, H, R, N), (Bs, H, R, P)
    else:
        ks, vs = (Bs, H, N), (Bs, H, P)
    # What the CPU forward keeps for the backward (csrc/mamba3/mamba3_op.cpp); empty on CUDA.
    if v.device.type == "cuda" or not save_for_backward:
        saved = ((0,), (0,))
    else:
        slots = H * (L // chunk_size + Bs) if cu_seqlens is not None else B * H * -(-L // chunk_size)
        saved = ((slots, P, N), (B, H, L, R, P))
    return (
        v.new_empty(v.shape),
        v.new_empty((Bs, H, A), dtype=acc),
        v.new_empty((Bs, H, P, N), dtype=acc),
        v.new_empty(ks, dtype=acc),
        v.new_empty(vs, dtype=acc),
        *(v.new_empty(shape, dtype=acc) for shape in saved),
    )


@_op.fake("mamba3_step")
def _(v):
    return v.new_empty(v.shape)


_op.register("mamba3_scan_fwd", "mamba3_scan_bwd")
