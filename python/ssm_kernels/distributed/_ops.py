"""Context-parallel versions of the ops: the sequence is split across the ranks of a process group.

Scans (linear_scan, selective_scan, ssd_scan): every rank but the first reduces its shard to a
summary (decay over the shard, final state from zero), the summaries are all-gathered, each rank
folds the summaries of the pieces before it into its incoming state and runs the op once more from
that state. Convolutions (causal_conv1d, fftconv) all-gather the tails of the previous pieces
(halo) and run the op on [halo, shard]. docs/context_parallel.md has the derivation and costs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.linear_scan import _acc_dtype as _linear_acc_dtype
from ..ops.selective_scan import _state_dtype as _selective_state_dtype
from . import _comm

# torch.compile runs these eagerly, between graphs: their collectives and host-side validation
# stay out of the traced graph; the kernels they call are opaque custom ops either way.
_compile_boundary = torch.compiler.disable

_REAL = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_COMPLEX = (torch.complex64, torch.complex128)


def _shape_or_none(fn):
    try:
        return tuple(fn())
    except (AttributeError, IndexError, TypeError):
        return None


def _fold_states(expand, reverse: bool):
    """combine for _comm.exchange: the state entering each piece from the pieces before it.

    decay [P, ...], state [P, ...] (by piece position) -> (h_in [P, ...],) with h_in of the first
    piece zero (that rank starts from the real initial state) and
    h_in[p + 1] = decay[p] * h_in[p] + state[p]  (p + 1 -> p - 1 with reverse).
    """
    def combine(decay, state):
        n = state.shape[0]
        h = torch.zeros_like(state[0])
        incoming = [None] * n
        for p in (reversed(range(n)) if reverse else range(n)):
            incoming[p] = h
            h = expand(decay[p]) * h + state[p]
        return (torch.stack(incoming),)
    return combine


def _run_scan(layout, label, first_pass, summary, resume, expand, decay_shape, reverse=False):
    """The scan protocol shared by the three scans.

    first_pass() -> (out, last) on the piece that starts the recurrence (with the real initial
    state); summary() -> (decay [decay_shape], state from zero) elsewhere; resume(h_in) -> (out,
    last). The starting piece sends a zero decay (it multiplies a zero incoming state).
    """
    starts = layout.is_last if reverse else layout.is_first
    if starts:
        out, last = first_pass()
        decay = last.new_zeros(decay_shape)
        (h_in,) = _comm.exchange(_fold_states(expand, reverse), layout, label, decay, last)
        return _comm.attach(out, h_in), last
    decay, state = summary()
    (h_in,) = _comm.exchange(_fold_states(expand, reverse), layout, label, decay, state)
    return resume(h_in)


@_compile_boundary
def linear_scan(a: torch.Tensor, b: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                reverse: bool = False, return_last_state: bool = False, *, process_group=None,
                shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``linear_scan``: a, b [..., L_r] are this rank's piece of the sequence.

    initial_state is read on the rank holding the first piece (the last piece with reverse);
    last_state is the state at the end of this rank's piece (the global final state on the rank
    holding the last piece; the first piece with reverse). Differentiable in a, b, initial_state.
    """
    layout = _comm.setup(
        "linear_scan", process_group, shard_order,
        {"a": (a, -1), "b": (b, -1), "initial_state": (initial_state, None)},
        {"reverse": reverse},
        first_only={"initial_state": (_shape_or_none(lambda: a.shape[:-1]),
                                      _COMPLEX if a.is_complex() else _REAL)},
        starts_at_end=bool(reverse))
    acc = _linear_acc_dtype(a.dtype)

    def first_pass():
        return ops.linear_scan(a, b, initial_state, reverse=reverse, return_last_state=True)

    def summary():
        _, state = ops.linear_scan(a, b, None, reverse=reverse, return_last_state=True)
        return a.to(acc).prod(-1), state

    def resume(h_in):
        return ops.linear_scan(a, b, h_in, reverse=reverse, return_last_state=True)

    out, last = _run_scan(layout, "linear_scan", first_pass, summary, resume, lambda d: d, a.shape[:-1],
                          reverse=reverse)
    return (out, last) if return_last_state else out


@_compile_boundary
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, delta_softplus: bool = False,
                   initial_state: Optional[torch.Tensor] = None, return_last_state: bool = False, *,
                   process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``selective_scan``: u, delta, z and variable/grouped B, C hold this rank's
    piece [..., L_r]; fixed B, C and the parameters are the same on every rank.

    The shard's decay is exp(A * sum_t dt_t) [B, D, N]; its zero-start final state comes from a
    first selective_scan without D and z. initial_state [B, D, N] is read on the first piece's
    rank; last_state is the state at the end of this rank's piece.
    """
    layout = _comm.setup(
        "selective_scan", process_group, shard_order,
        {"u": (u, -1), "delta": (delta, -1), "A": (A, None),
         "B": (B, -1 if isinstance(B, torch.Tensor) and B.dim() > 2 else None),
         "C": (C, -1 if isinstance(C, torch.Tensor) and C.dim() > 2 else None),
         "D": (D, None), "z": (z, -1), "delta_bias": (delta_bias, None),
         "initial_state": (initial_state, None)},
        {"delta_softplus": bool(delta_softplus)},
        first_only={"initial_state": (_shape_or_none(lambda: (u.shape[0], u.shape[1], A.shape[1])),
                                      _COMPLEX if A.is_complex() else _REAL)})
    sd = _selective_state_dtype(u, A.is_complex())
    real = torch.float64 if u.dtype == torch.float64 else torch.float32
    init = None if initial_state is None else initial_state.to(sd)

    def first_pass():
        return ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, init, True)

    def summary():
        _, state = ops.selective_scan(u, delta, A, B, C, None, None, delta_bias, delta_softplus, None, True)
        dt = delta.to(real)
        if delta_bias is not None:
            dt = dt + delta_bias.to(real)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        return torch.exp(dt.sum(-1)[..., None] * A.to(sd)), state  # [B, D, N]

    def resume(h_in):
        return ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h_in, True)

    out, last = _run_scan(layout, "selective_scan", first_pass, summary, resume, lambda d: d,
                          (u.shape[0], u.shape[1], A.shape[1]))
    return (out, last) if return_last_state else out


@_compile_boundary
def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int = 256, D: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
             dt_bias: Optional[torch.Tensor] = None, dt_softplus: bool = False,
             dt_limit: Sequence[float] = (0.0, float("inf")), initial_states: Optional[torch.Tensor] = None,
             seq_idx: Optional[torch.Tensor] = None, return_final_states: bool = False, *,
             process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``ssd_scan``: x [B, L_r, H, P], dt, B, C, z hold this rank's piece.

    The summary needs no scan: with dt' the discretised dt, the zero-start final state is
    sum_t exp(A sum_{s>t} dt'_s) dt'_t x_t B_t^T (one GEMM per head over the shard) and the decay
    exp(A sum_t dt'_t). initial_states [B, H, P, N] is read on the first piece's rank;
    final_states is the state at the end of this rank's piece. seq_idx (packed sequences) is not
    supported with context parallelism yet.
    """
    layout = _comm.setup(
        "ssd_scan", process_group, shard_order,
        {"x": (x, 1), "dt": (dt, 1), "A": (A, None), "B": (B, 1), "C": (C, 1), "D": (D, None),
         "z": (z, 1), "dt_bias": (dt_bias, None), "initial_states": (initial_states, None),
         "seq_idx": (seq_idx, 1)},
        {"chunk_size": chunk_size, "dt_softplus": bool(dt_softplus), "dt_limit": tuple(dt_limit)},
        first_only={"initial_states": (_shape_or_none(lambda: (x.shape[0], x.shape[2], x.shape[3], B.shape[3])),
                                       _REAL)})
    if seq_idx is not None:
        raise ValueError("seq_idx: packed sequences are not supported with context parallelism yet")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    init = None if initial_states is None else initial_states.to(acc)
    kwargs = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)

    def first_pass():
        return ops.ssd_scan(x, dt, A, B, C, initial_states=init, return_final_states=True, **kwargs)

    def summary():
        batch, seqlen, nheads, headdim = x.shape
        groups, dstate = B.shape[2], B.shape[3]
        d = dt.to(acc)
        if dt_bias is not None:
            d = d + dt_bias.to(acc)
        if dt_softplus:
            d = F.softplus(d)
        if tuple(dt_limit) != (0.0, math.inf):
            d = d.clamp(dt_limit[0], dt_limit[1])
        a = A.to(acc)
        total = d.sum(1)  # [B, H]
        after = torch.cat([d[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(d[:, :1])], dim=1)  # [B, L, H]
        weight = torch.exp(after * a) * d  # [B, L, H]
        xw = (x.to(acc) * weight[..., None]).view(batch, seqlen, groups, nheads // groups, headdim)
        state = torch.einsum("blgrp,blgn->bgrpn", xw, B.to(acc)).reshape(batch, nheads, headdim, dstate)
        return torch.exp(total * a), state

    def resume(h_in):
        return ops.ssd_scan(x, dt, A, B, C, initial_states=h_in, return_final_states=True, **kwargs)

    out, last = _run_scan(layout, "ssd_scan", first_pass, summary, resume, lambda d: d[..., None, None],
                          (x.shape[0], x.shape[2]))
    return (out, last) if return_final_states else out


def _halo_combine(lengths: Sequence[int], keep: Sequence[int], width: int):
    """combine for _comm.exchange: the last `width` inputs before each piece.

    tails [P, B, D, T]: the last keep[p] entries of each are piece p's last inputs (right-aligned).
    Returns ([P, B, D, width],): for each piece the concatenated tails of the pieces before it,
    truncated to the last `width` and left-padded with zeros.
    """
    def combine(tails):
        n, t = tails.shape[0], tails.shape[-1]
        h = tails.new_zeros(tails.shape[1:-1] + (width,))
        halos = []
        for p in range(n):
            halos.append(h)
            h = torch.cat([h, tails[p][..., t - keep[p]:]], dim=-1)[..., -width:] if width else h
        return (torch.stack(halos),)
    return combine


@_compile_boundary
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, initial_states: Optional[torch.Tensor] = None,
                  return_final_states: bool = False, seq_idx: Optional[torch.Tensor] = None, *,
                  process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``causal_conv1d``: x [B, D, L_r] is this rank's piece.

    Each rank all-gathers the last W-1 inputs of every piece (fewer when a piece is shorter) and
    runs causal_conv1d with the W-1 inputs before its piece, which may come from several earlier
    pieces, as initial_states. initial_states [B, D, W-1] is read on the first piece's rank;
    final_states are the W-1 inputs ending this rank's piece (global ones on the last piece).
    """
    width = _shape_or_none(lambda: weight.shape[1:2])
    layout = _comm.setup(
        "causal_conv1d", process_group, shard_order,
        {"x": (x, 2), "weight": (weight, None), "bias": (bias, None), "initial_states": (initial_states, None),
         "seq_idx": (seq_idx, 1)},
        {"activation": activation},
        first_only={"initial_states": (_shape_or_none(lambda: (x.shape[0], x.shape[1], weight.shape[1] - 1)),
                                       _REAL)})
    if seq_idx is not None:
        raise ValueError("seq_idx: packed sequences are not supported with context parallelism yet")
    halo = width[0] - 1 if width else 0
    init = None if initial_states is None else initial_states.to(x.dtype)
    keep = [halo] + [min(n, halo) for n in layout.lengths[1:]]
    if layout.is_first:
        head = init if init is not None else x.new_zeros(x.shape[0], x.shape[1], halo)
        tail = torch.cat([head, x], dim=-1)[..., x.shape[-1]:]
    else:
        n = keep[layout.position]
        tail = F.pad(x[..., x.shape[-1] - n:], (halo - n, 0))
    (before,) = _comm.exchange(_halo_combine(layout.lengths, keep, halo), layout, "causal_conv1d", tail)
    if layout.is_first:
        out, final = ops.causal_conv1d(x, weight, bias, activation, init, True)
        out = _comm.attach(out, before)
    else:
        out, final = ops.causal_conv1d(x, weight, bias, activation, before, True)
    return (out, final) if return_final_states else out


@_compile_boundary
def fftconv(u: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor] = None, k_rev: Optional[torch.Tensor] = None,
            pregate: Optional[torch.Tensor] = None, postgate: Optional[torch.Tensor] = None,
            activation: Optional[str] = None, *, process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``fftconv`` by overlap-save: u [B, D, L_r] is this rank's piece.

    A piece starting at position s needs the min(K-1, s) gated inputs v = u * pregate before it:
    they are all-gathered (the tails of the earlier pieces) and fftconv runs on [halo, piece] with
    the halo already gated; the halo's outputs are dropped. The halo is up to K-1 steps, so for a
    kernel as long as the sequence this moves the earlier activations (docs/context_parallel.md).
    k_rev (anti-causal taps) is not supported with context parallelism.
    """
    layout = _comm.setup(
        "fftconv", process_group, shard_order,
        {"u": (u, 2), "k": (k, None), "D": (D, None), "k_rev": (k_rev, None), "pregate": (pregate, 2),
         "postgate": (postgate, 2)},
        {"activation": activation})
    if k_rev is not None:
        raise ValueError("k_rev: anti-causal taps are not supported with context parallelism")
    reach = k.shape[1] - 1
    starts = [sum(layout.lengths[:p]) for p in range(layout.size)]
    need = [min(reach, s) for s in starts]  # halo of each piece
    keep = [min(n, reach) for n in layout.lengths]
    wire = max(keep[:-1], default=0)
    widest = max(need)
    if widest == 0:  # kernel of one tap, or a single piece
        return ops.fftconv(u, k, D, None, pregate, postgate, activation)
    v = u if pregate is None else u * pregate
    n = keep[layout.position]
    tail = F.pad(v[..., v.shape[-1] - min(n, wire):], (wire - min(n, wire), 0))
    keep = [min(kp, wire) for kp in keep]
    (before,) = _comm.exchange(_halo_combine(layout.lengths, keep, widest), layout, "fftconv", tail)
    h = need[layout.position]
    if h == 0:
        return _comm.attach(ops.fftconv(u, k, D, None, pregate, postgate, activation), before)
    halo = before[..., widest - h:]
    ones = u.new_ones(u.shape[0], u.shape[1], h)
    u_ext = torch.cat([halo, u], dim=-1)
    pre = None if pregate is None else torch.cat([ones, pregate], dim=-1)
    post = None if postgate is None else torch.cat([ones, postgate], dim=-1)
    return ops.fftconv(u_ext, k, D, None, pre, post, activation)[..., h:]
