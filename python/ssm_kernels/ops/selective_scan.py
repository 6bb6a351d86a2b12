"""Mamba-1 selective scan and its decode step (API.md: Mamba-1: selective scan)."""
from __future__ import annotations

from typing import Optional

import torch

from . import _op

# Steps between two saved states of the forward (csrc/selective_scan/selective_scan_math.h).
CHUNK_SIZE = 2048
MAX_DSTATE = 256


def _state_dtype(u: torch.Tensor, is_complex: bool) -> torch.dtype:
    wide = u.dtype == torch.float64
    if is_complex:
        return torch.complex128 if wide else torch.complex64
    return torch.float64 if wide else torch.float32


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    initial_state: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
):
    """Mamba-1 selective scan (differentiable in every tensor argument).

    Per (b, d, n): dt_t = softplus?(delta_t + delta_bias); h_t = exp(dt_t A[d, n]) h_{t-1} +
    dt_t B_t[n] u_t with h_{-1} = initial_state (zeros if None); y_t = sum_n C_t[n] h_t[n]
    (2 Re(...) for complex A); out_t = (y_t + D[d] u_t) * silu(z_t).

    Args:
        u, delta: [B, D, L] float32/float16/bfloat16 (float64 accepted), same dtype, any strides.
        A: [D, N] float32 or complex64, 1 <= N <= 256.
        B, C: each fixed [D, N] (A's dtype), variable [B, N, L] or grouped [B, G, N, L] (u's dtype;
            complex64 when A is complex) with G dividing D; channel d uses group d // (D // G).
        D, delta_bias: [D] or None.  z: [B, D, L] like u, or None.
        delta_softplus: apply softplus to delta + delta_bias.
        initial_state: [B, D, N] float32 (complex64 for complex A), or None.
        return_last_state: also return h_L, [B, D, N] float32/complex64. Its gradient is
            propagated.
        cu_seqlens: packed sequences (API.md: packed sequences), [S + 1] int32/int64 offsets along
            L with batch 1: starting at 0, non-decreasing, ending at L. Each sequence runs on its
            own; initial_state and last_state are then per sequence, [S, D, N]. An empty sequence
            (equal neighbouring offsets) has last_state == initial_state.
        seq_idx: [B, L] int32, non-decreasing along L: the state restarts from zero where the
            index changes; initial_state / last_state stay [B, D, N] (each row's first / last
            sequence). Not together with cu_seqlens.

    Returns:
        out [B, D, L] in u's dtype, or (out, last_state).

    Raises:
        TypeError/ValueError naming the argument for a wrong type, dtype, shape, device, groups not
        dividing dim, dstate above 256, complex B/C with real A, or bad cu_seqlens/seq_idx (content
        checked for CPU tensors; see API.md for CUDA).

    Example:
        >>> u, delta = torch.randn(2, 64, 100), torch.rand(2, 64, 100)
        >>> A = -torch.rand(64, 16)
        >>> B, C = torch.randn(2, 16, 100), torch.randn(2, 16, 100)
        >>> out = selective_scan(u, delta, A, B, C, delta_softplus=True)
    """
    out, last_state, _ = _op.call(
        "selective_scan_fwd", u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
        delta_softplus=bool(delta_softplus), initial_state=initial_state, cu_seqlens=cu_seqlens,
        seq_idx=seq_idx,
    )
    return (out, last_state) if return_last_state else out


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One selective-scan decode step; updates ``state`` in place (not differentiable).

    h = exp(dt A) h + dt B x;  out = (sum_n C h + D x) * silu(z), with dt = softplus?(dt + dt_bias).

    Layouts:
        no heads: state [B_state, D, N]; x, dt, z [B, D]; A [D, N]; B, C [B, N]; D, dt_bias [D].
        heads:    state [B_state, H, P, N]; x, dt, z [B, H, P]; A [H, P, N]; B, C [B, G, N] with G
                  dividing H (head h uses group h // (H // G)); D, dt_bias [H, P].
    x, dt, z are float32/float16/bfloat16 (same dtype); state is float32 (float64 for float64 x).
    state_batch_indices: [B] int32/int64: row i updates state[state_batch_indices[i]]; a negative
    index leaves the state untouched and outputs zeros. On CPU an index >= B_state raises; on
    CUDA (where checking would need a host sync) it acts like a negative one.

    Returns:
        out, shaped like x, in x's dtype.

    Raises:
        TypeError/ValueError naming the argument for a wrong shape, dtype or device.

    Example:
        >>> state = torch.zeros(2, 64, 16)
        >>> out = selective_state_update(state, torch.randn(2, 64), torch.rand(2, 64),
        ...                              -torch.rand(64, 16), torch.randn(2, 16), torch.randn(2, 16))
    """
    return _op.call(
        "selective_state_update", state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=bool(dt_softplus), state_batch_indices=state_batch_indices,
    )


@_op.fake("selective_scan_fwd")
def _(u, A, cu_seqlens):
    batch, dim, seqlen = u.shape
    state_batch = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dstate = A.shape[1]
    n_chunks = (seqlen + CHUNK_SIZE - 1) // CHUNK_SIZE
    sd = _state_dtype(u, A.is_complex())
    return (
        u.new_empty((batch, dim, seqlen)),
        u.new_empty((state_batch, dim, dstate), dtype=sd),
        u.new_empty((batch, dim, n_chunks, dstate), dtype=sd),
    )


@_op.fake("selective_state_update")
def _(x):
    return x.new_empty(x.shape)


_op.register("selective_scan_fwd", "selective_scan_bwd")
