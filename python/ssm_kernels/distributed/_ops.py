"""Context-parallel versions of the ops: the sequence is split across the ranks of a process group.

Scans (linear_scan, selective_scan, ssd_scan): every rank but the first reduces its shard to a
summary (decay over the shard, final state from zero), the summaries are all-gathered, each rank
folds the summaries of the pieces before it into its incoming state and runs the op once more from
that state. Convolutions (causal_conv1d, fftconv) all-gather the tails of the previous pieces
(halo) and run the op on [halo, shard]. With packed sequences (seq_idx / cu_seqlens) a piece's
decay is zero unless the whole piece continues the sequence it enters in, the incoming state only
enters that sequence, and the halo only reaches into it. docs/context_parallel.md has the
derivation and costs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.linear_scan import _acc_dtype as _linear_acc_dtype
from ..ops.selective_scan import _state_dtype as _selective_state_dtype
from . import _comm, _packing

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


def _with_row(rows: torch.Tensor, index: int, value: torch.Tensor) -> torch.Tensor:
    """rows [S, ...] with row `index` replaced by value [1, ...] (out of place, differentiable)."""
    return torch.cat([rows[:index], value.to(rows.dtype), rows[index + 1:]])


def _zero_where_not(flags: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.where(flags, t, torch.zeros((), dtype=t.dtype, device=t.device))


def _run_packed_scan(layout, pk, label, run, summary, init, decay, expand, reverse=False):
    """The scan protocol over packed sequences.

    run(init) -> (out, final) runs the op on this piece with its packing (the local seq_idx, or
    the offsets clipped to the piece); init and final are [B, ...] (seq_idx: the row's first and
    last sequence) or [S, ...] (cu_seqlens: per sequence; init the user's rows or zeros).
    summary(init0, exit_of) -> the state after the piece's last token with nothing entering
    (init0: init with the entered sequence's row zeroed; None with seq_idx). decay [B, ...]: the
    decay over the whole piece; it is sent only where the piece lies inside the sequence the
    recurrence enters it in (elsewhere the incoming state stops inside the piece, so 0 is sent).
    The incoming state enters only that sequence; with cu_seqlens the final states are kept for
    the sequences ending on this piece (the others are zero: summed over the ranks they give the
    global final states).
    """
    p = layout.position
    starts = layout.is_last if reverse else layout.is_first
    enters, passes = pk.enters(p, reverse), pk.passes(p, reverse)
    if pk.per_sequence:
        entry = (pk.last if reverse else pk.first)[p][0]
        exit_row = (pk.first if reverse else pk.last)[p][0]

        def exit_of(fin):
            return fin[exit_row:exit_row + 1]

        def finish(fin):
            return _zero_where_not(pk.mask(pk.owned(reverse), fin, fin.dim()), fin)
    else:
        def exit_of(fin):
            return fin

        def finish(fin):
            return fin
    if starts:
        out, fin = run(init)
        state = exit_of(fin)
        (h_in,) = _comm.exchange(_fold_states(expand, reverse), layout, label, state.new_zeros(decay.shape), state)
        return _comm.attach(out, h_in), finish(fin)
    if pk.per_sequence:
        init0 = _with_row(init, entry, init.new_zeros((1,) + init.shape[1:])) if enters[0] else init
    else:
        init0 = None
    state = summary(init0, exit_of)
    decay = _zero_where_not(pk.mask(passes, decay, decay.dim()), decay).to(state.dtype)
    (h_in,) = _comm.exchange(_fold_states(expand, reverse), layout, label, decay, state)
    if pk.per_sequence:
        if enters[0]:
            out, fin = run(_with_row(init, entry, h_in))
        else:
            out, fin = run(init)
            out = _comm.attach(out, h_in)
    else:
        out, fin = run(_zero_where_not(pk.mask(enters, h_in, h_in.dim()), h_in))
    return out, finish(fin)


def _packing_kwargs(pk, device) -> dict:
    """The local packing arguments of the single-process op on this piece."""
    if pk.per_sequence:
        return {"cu_seqlens": pk.local_cu_seqlens(device)}
    return {"seq_idx": pk.seq_idx}


def _initial_rows(pk, initial, shape, dtype, device):
    """cu_seqlens form: the per-sequence initial states [S, *shape] in the state dtype (zeros when
    not given); seq_idx form: the initial state as given (read on the starting piece only)."""
    if not pk.per_sequence:
        return None if initial is None else initial.to(dtype)
    if initial is None:
        return torch.zeros((pk.num_seqs,) + tuple(shape), dtype=dtype, device=device)
    return initial.to(dtype)


def _packing_specs(seq_idx, cu_seqlens) -> dict:
    # Validated before the initial states, whose rule (read on one rank or on all) depends on
    # the form: a form differing between ranks then raises first, the same error everywhere.
    return {"cu_seqlens": (cu_seqlens, None), "seq_idx": (seq_idx, 1)}


@_compile_boundary
def linear_scan(a: torch.Tensor, b: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                reverse: bool = False, return_last_state: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None, *, process_group=None,
                shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``linear_scan``: a, b [..., L_r] are this rank's piece of the sequence.

    initial_state is read on the rank holding the first piece (the last piece with reverse);
    last_state is the state at the end of this rank's piece (the global final state on the rank
    holding the last piece; the first piece with reverse). Differentiable in a, b, initial_state.
    Packed sequences: seq_idx [B, L_r] int32 is this piece of the global seq_idx (same
    semantics as the op); or cu_seqlens [S + 1], the global offsets on every rank, with
    initial_state [S, ...] on every rank (each sequence's row is read where the recurrence enters
    it) and last_state [S, ...] holding the sequences ending on this piece, zero elsewhere.
    """
    per_seq = cu_seqlens is not None
    layout = _comm.setup(
        "linear_scan", process_group, shard_order,
        {"a": (a, -1), "b": (b, -1), **_packing_specs(seq_idx, cu_seqlens), "initial_state": (initial_state, None)},
        {"reverse": reverse, "cu_seqlens": _packing.cu_seqlens_code(cu_seqlens)},
        first_only={} if per_seq else {"initial_state": (_shape_or_none(lambda: a.shape[:-1]),
                                                         _COMPLEX if a.is_complex() else _REAL)},
        starts_at_end=bool(reverse))
    acc = _linear_acc_dtype(a.dtype)
    pk = _packing.setup("linear_scan", layout, seq_idx, cu_seqlens, a.shape[0] if a.dim() > 1 else 1, a.device)
    if pk is not None:
        packing = _packing_kwargs(pk, a.device)

        def run(init):
            return ops.linear_scan(a, b, init, reverse, True, **packing)

        def summary(init0, exit_of):
            return exit_of(ops.linear_scan(a, b, init0, reverse, True, **packing)[1])

        init = _initial_rows(pk, initial_state, a.shape[1:-1], acc, a.device)
        out, last = _run_packed_scan(layout, pk, "linear_scan", run, summary, init, a.to(acc).prod(-1),
                                     lambda d: d, reverse=reverse)
        return (out, last) if return_last_state else out

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
                   initial_state: Optional[torch.Tensor] = None, return_last_state: bool = False,
                   cu_seqlens: Optional[torch.Tensor] = None, seq_idx: Optional[torch.Tensor] = None, *,
                   process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``selective_scan``: u, delta, z and variable/grouped B, C hold this rank's
    piece [..., L_r]; fixed B, C and the parameters are the same on every rank.

    The shard's decay is exp(A * sum_t dt_t) [B, D, N]; its zero-start final state comes from a
    first selective_scan without D and z. initial_state [B, D, N] is read on the first piece's
    rank; last_state is the state at the end of this rank's piece. Packed sequences: seq_idx
    [B, L_r] (this piece of the global seq_idx) or cu_seqlens [S + 1] (global, on every rank;
    initial_state and last_state [S, D, N] as for linear_scan).
    """
    per_seq = cu_seqlens is not None
    layout = _comm.setup(
        "selective_scan", process_group, shard_order,
        {"u": (u, -1), "delta": (delta, -1), "A": (A, None),
         "B": (B, -1 if isinstance(B, torch.Tensor) and B.dim() > 2 else None),
         "C": (C, -1 if isinstance(C, torch.Tensor) and C.dim() > 2 else None),
         "D": (D, None), "z": (z, -1), "delta_bias": (delta_bias, None), **_packing_specs(seq_idx, cu_seqlens),
         "initial_state": (initial_state, None)},
        {"delta_softplus": bool(delta_softplus), "cu_seqlens": _packing.cu_seqlens_code(cu_seqlens)},
        first_only={} if per_seq else {
            "initial_state": (_shape_or_none(lambda: (u.shape[0], u.shape[1], A.shape[1])),
                              _COMPLEX if A.is_complex() else _REAL)})
    sd = _selective_state_dtype(u, A.is_complex())
    real = torch.float64 if u.dtype == torch.float64 else torch.float32
    init = None if initial_state is None else initial_state.to(sd)

    def decay():
        dt = delta.to(real)
        if delta_bias is not None:
            dt = dt + delta_bias.to(real)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        return torch.exp(dt.sum(-1)[..., None] * A.to(sd))  # [B, D, N]

    pk = _packing.setup("selective_scan", layout, seq_idx, cu_seqlens, u.shape[0], u.device)
    if pk is not None:
        packing = _packing_kwargs(pk, u.device)

        def run(h0):
            return ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, True, **packing)

        def summary(init0, exit_of):
            return exit_of(ops.selective_scan(u, delta, A, B, C, None, None, delta_bias, delta_softplus, init0,
                                              True, **packing)[1])

        rows = _initial_rows(pk, initial_state, (u.shape[1], A.shape[1]), sd, u.device)
        out, last = _run_packed_scan(layout, pk, "selective_scan", run, summary, rows, decay(), lambda d: d)
        return (out, last) if return_last_state else out

    def first_pass():
        return ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, init, True)

    def summary():
        _, state = ops.selective_scan(u, delta, A, B, C, None, None, delta_bias, delta_softplus, None, True)
        return decay(), state

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
             seq_idx: Optional[torch.Tensor] = None, return_final_states: bool = False,
             cu_seqlens: Optional[torch.Tensor] = None, *,
             process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``ssd_scan``: x [B, L_r, H, P], dt, B, C, z hold this rank's piece.

    The summary needs no scan: with dt' the discretised dt, the zero-start final state is
    sum_t exp(A sum_{s>t} dt'_s) dt'_t x_t B_t^T (one GEMM per head over the shard) and the decay
    exp(A sum_t dt'_t). initial_states [B, H, P, N] is read on the first piece's rank;
    final_states is the state at the end of this rank's piece. Packed sequences: seq_idx
    [B, L_r] (this piece of the global seq_idx; the GEMM then runs over the piece's last
    sequence only) or cu_seqlens [S + 1] (global, on every rank; initial_states and final_states
    [S, H, P, N] as for linear_scan).
    """
    per_seq = cu_seqlens is not None
    layout = _comm.setup(
        "ssd_scan", process_group, shard_order,
        {"x": (x, 1), "dt": (dt, 1), "A": (A, None), "B": (B, 1), "C": (C, 1), "D": (D, None),
         "z": (z, 1), "dt_bias": (dt_bias, None), **_packing_specs(seq_idx, cu_seqlens),
         "initial_states": (initial_states, None)},
        {"chunk_size": chunk_size, "dt_softplus": bool(dt_softplus), "dt_limit": tuple(dt_limit),
         "cu_seqlens": _packing.cu_seqlens_code(cu_seqlens)},
        first_only={} if per_seq else {
            "initial_states": (_shape_or_none(lambda: (x.shape[0], x.shape[2], x.shape[3], B.shape[3])), _REAL)})
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    init = None if initial_states is None else initial_states.to(acc)
    kwargs = dict(chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit)

    def discretised_dt():
        d = dt.to(acc)
        if dt_bias is not None:
            d = d + dt_bias.to(acc)
        if dt_softplus:
            d = F.softplus(d)
        if tuple(dt_limit) != (0.0, math.inf):
            d = d.clamp(dt_limit[0], dt_limit[1])
        return d  # [B, L, H]

    def zero_start_state(d):
        """sum_t exp(A sum_{s>t} d_s) d_t x_t B_t^T: [B, H, P, N]."""
        batch, seqlen, nheads, headdim = x.shape
        groups, dstate = B.shape[2], B.shape[3]
        after = torch.cat([d[:, 1:].flip(1).cumsum(1).flip(1), torch.zeros_like(d[:, :1])], dim=1)  # [B, L, H]
        weight = torch.exp(after * A.to(acc)) * d  # [B, L, H]
        xw = (x.to(acc) * weight[..., None]).view(batch, seqlen, groups, nheads // groups, headdim)
        return torch.einsum("blgrp,blgn->bgrpn", xw, B.to(acc)).reshape(batch, nheads, headdim, dstate)

    pk = _packing.setup("ssd_scan", layout, seq_idx, cu_seqlens, x.shape[0], x.device)
    if pk is not None:
        packing = _packing_kwargs(pk, x.device)
        p = layout.position

        def run(h0):
            return ops.ssd_scan(x, dt, A, B, C, initial_states=h0, return_final_states=True, **kwargs, **packing)

        def summary(init0, exit_of):
            # Only the piece's last sequence reaches its end: dt' is zeroed on the other tokens.
            last_ids = torch.tensor(pk.last[p], dtype=pk.seq_idx.dtype, device=x.device)
            d = _zero_where_not((pk.seq_idx == last_ids[:, None])[..., None], discretised_dt())  # [B, L, H]
            state = zero_start_state(d)
            if pk.per_sequence and not pk.passes(p)[0]:  # the last sequence starts here: its initial state
                state = state + torch.exp(d.sum(1) * A.to(acc))[..., None, None] * exit_of(init0)
            return state

        rows = _initial_rows(pk, initial_states, (x.shape[2], x.shape[3], B.shape[3]), acc, x.device)
        total = torch.exp(discretised_dt().sum(1) * A.to(acc))  # [B, H]
        out, last = _run_packed_scan(layout, pk, "ssd_scan", run, summary, rows, total, lambda d: d[..., None, None])
        return (out, last) if return_final_states else out

    def first_pass():
        return ops.ssd_scan(x, dt, A, B, C, initial_states=init, return_final_states=True, **kwargs)

    def summary():
        d = discretised_dt()
        return torch.exp(d.sum(1) * A.to(acc)), zero_start_state(d)

    def resume(h_in):
        return ops.ssd_scan(x, dt, A, B, C, initial_states=h_in, return_final_states=True, **kwargs)

    out, last = _run_scan(layout, "ssd_scan", first_pass, summary, resume, lambda d: d[..., None, None],
                          (x.shape[0], x.shape[2]))
    return (out, last) if return_final_states else out


def _halo_combine(lengths: Sequence[int], keep: Sequence[int], width: int, passes=None):
    """combine for _comm.exchange: the last `width` inputs before each piece.

    tails [P, B, D, T]: the last keep[p] entries of each are piece p's last inputs (right-aligned).
    Returns ([P, B, D, width],): for each piece the concatenated tails of the pieces before it,
    truncated to the last `width` and left-padded with zeros. With packed sequences, passes
    [P, B, 1, 1] bools says where a piece continues the stream of the pieces before it; elsewhere
    its tail (then a full `width`, the inputs of its last sequence) restarts the stream.
    """
    def combine(tails):
        n, t = tails.shape[0], tails.shape[-1]
        h = tails.new_zeros(tails.shape[1:-1] + (width,))
        halos = []
        for p in range(n):
            halos.append(h)
            if width:
                joined = torch.cat([h, tails[p][..., t - keep[p]:]], dim=-1)[..., -width:]
                h = joined if passes is None else torch.where(passes[p], joined, tails[p][..., t - width:])
        return (torch.stack(halos),)
    return combine


@_compile_boundary
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: Optional[str] = None, initial_states: Optional[torch.Tensor] = None,
                  return_final_states: bool = False, seq_idx: Optional[torch.Tensor] = None,
                  cu_seqlens: Optional[torch.Tensor] = None, *,
                  process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``causal_conv1d``: x [B, D, L_r] is this rank's piece.

    Each rank all-gathers the last W-1 inputs of every piece (fewer when a piece is shorter) and
    runs causal_conv1d with the W-1 inputs before its piece, which may come from several earlier
    pieces, as initial_states. initial_states [B, D, W-1] is read on the first piece's rank;
    final_states are the W-1 inputs ending this rank's piece (global ones on the last piece).
    Packed sequences: seq_idx [B, L_r] (this piece of the global seq_idx) or cu_seqlens [S + 1]
    (global, on every rank; initial_states [S, D, W-1] on every rank, final_states [S, D, W-1]
    holding the sequences ending on this piece, zero elsewhere). Each piece then sends the last
    W-1 inputs of its last sequence (preceded by that sequence's initial state or zeros where it
    starts inside the piece), so the halo never reaches into another sequence.
    """
    per_seq = cu_seqlens is not None
    width = _shape_or_none(lambda: weight.shape[1:2])
    layout = _comm.setup(
        "causal_conv1d", process_group, shard_order,
        {"x": (x, 2), "weight": (weight, None), "bias": (bias, None), **_packing_specs(seq_idx, cu_seqlens),
         "initial_states": (initial_states, None)},
        {"activation": activation, "cu_seqlens": _packing.cu_seqlens_code(cu_seqlens)},
        first_only={} if per_seq else {
            "initial_states": (_shape_or_none(lambda: (x.shape[0], x.shape[1], weight.shape[1] - 1)), _REAL)})
    halo = width[0] - 1 if width else 0
    init = None if initial_states is None else initial_states.to(x.dtype)
    keep = [halo] + [min(n, halo) for n in layout.lengths[1:]]
    pk = _packing.setup("causal_conv1d", layout, seq_idx, cu_seqlens, x.shape[0], x.device)
    if pk is not None:
        return _packed_conv1d(layout, pk, x, weight, bias, activation, init, halo, return_final_states)
    if layout.is_first:
        head = init if init is not None else x.new_zeros(x.shape[0], x.shape[1], halo)
        tail = torch.cat([head, x], dim=-1)[..., x.shape[-1]:]
    else:
        n = keep[layout.position]
        tail = F.pad(x[..., x.shape[-1] - n:], (halo - n, 0))
    (before,) = _comm.exchange(_halo_combine(layout.lengths, keep, halo), layout, "causal_conv1d", tail)
    if layout.is_first:
        out, final = ops.causal_conv1d(x, weight, bias, activation, init, True)
        # the exchange's backward must run whichever of the two outputs is used
        out, final = _comm.attach(out, before), _comm.attach(final, before)
    else:
        out, final = ops.causal_conv1d(x, weight, bias, activation, before, True)
    return (out, final) if return_final_states else out


def _packed_conv1d(layout, pk, x, weight, bias, activation, init, halo, return_final_states):
    """causal_conv1d's halo exchange over packed sequences (see causal_conv1d)."""
    p, n = layout.position, x.shape[-1]
    keep = [min(length, halo) for length in layout.lengths]
    passes = torch.tensor([pk.passes(q) for q in range(layout.size)], dtype=torch.bool,
                          device=x.device)[:, :, None, None]  # [P, B, 1, 1]
    last_ids = torch.tensor(pk.last[p], dtype=pk.seq_idx.dtype, device=x.device)
    in_last = (pk.seq_idx == last_ids[:, None])[:, None, :]  # [B, 1, L_r]
    # What precedes this piece's last sequence when it starts here: its initial state (every
    # piece with cu_seqlens, the first piece's first sequence with seq_idx) or zeros.
    if pk.per_sequence:
        rows = init if init is not None else x.new_zeros(pk.num_seqs, x.shape[1], halo)
        fill = rows[pk.last[p][0]:pk.last[p][0] + 1]
    elif layout.is_first and init is not None:
        fill = _zero_where_not(pk.mask([f == l for f, l in zip(pk.first[0], pk.last[0])], init, 3), init)
    else:
        fill = x.new_zeros(x.shape[0], x.shape[1], halo)
    if pk.per_sequence:  # batch 1: the fill goes right before the last sequence's first token here
        k = pk.tail[p][0]
        tail = torch.cat([fill, x[..., n - k:]], dim=-1)[..., fill.shape[-1] + k - halo:]  # [1, D, W-1]
    else:  # a nonzero fill only where the whole piece is one sequence
        tail = torch.cat([fill, _zero_where_not(in_last, x)], dim=-1)[..., n:]  # [B, D, W-1]
    (before,) = _comm.exchange(_halo_combine(layout.lengths, keep, halo, passes), layout, "causal_conv1d", tail)
    enters = pk.enters(p)
    if pk.per_sequence:
        packing = {"cu_seqlens": pk.local_cu_seqlens(x.device)}
        entry = pk.first[p][0]
        h0 = _with_row(rows, entry, before) if enters[0] else rows
    else:
        packing = {"seq_idx": pk.seq_idx}
        h0 = init if layout.is_first else _zero_where_not(pk.mask(enters, before, 3), before)
    out, final = ops.causal_conv1d(x, weight, bias, activation, h0, True, **packing)
    # where the halo is not used, its backward must still run, whichever output is used
    out, final = _comm.attach(out, before), _comm.attach(final, before)
    if pk.per_sequence:
        final = _zero_where_not(pk.mask(pk.owned(), final, 3), final)
    return (out, final) if return_final_states else out


@_compile_boundary
def fftconv(u: torch.Tensor, k: torch.Tensor, D: Optional[torch.Tensor] = None, k_rev: Optional[torch.Tensor] = None,
            pregate: Optional[torch.Tensor] = None, postgate: Optional[torch.Tensor] = None,
            activation: Optional[str] = None, cu_seqlens: Optional[torch.Tensor] = None, *,
            process_group=None, shard_order: Optional[Sequence[int]] = None):
    """Context-parallel ``fftconv`` by overlap-save: u [B, D, L_r] is this rank's piece.

    A piece starting at position s needs the min(K-1, s) gated inputs v = u * pregate before it:
    they are all-gathered (the tails of the earlier pieces) and fftconv runs on [halo, piece] with
    the halo already gated; the halo's outputs are dropped. The halo is up to K-1 steps, so for a
    kernel as long as the sequence this moves the earlier activations (docs/context_parallel.md).
    k_rev (anti-causal taps) is not supported with context parallelism. Packed sequences:
    cu_seqlens [S + 1], the global offsets on every rank (batch 1); the halo then reaches back
    only into the sequence the piece starts in, and [halo, piece] runs with the offsets clipped
    to the piece, the halo joined to that sequence.
    """
    layout = _comm.setup(
        "fftconv", process_group, shard_order,
        {"u": (u, 2), "cu_seqlens": (cu_seqlens, None), "k": (k, None), "D": (D, None), "k_rev": (k_rev, None),
         "pregate": (pregate, 2), "postgate": (postgate, 2)},
        {"activation": activation, "cu_seqlens": _packing.cu_seqlens_code(cu_seqlens)})
    if k_rev is not None:
        raise ValueError("k_rev: anti-causal taps are not supported with context parallelism")
    pk = _packing.setup("fftconv", layout, None, cu_seqlens, u.shape[0], u.device)
    reach = k.shape[1] - 1
    if pk is None:
        starts = [sum(layout.lengths[:p]) for p in range(layout.size)]
        need = [min(reach, s) for s in starts]  # halo of each piece
        keep = [min(n, reach) for n in layout.lengths]
    else:
        # Only the sequence a piece starts in reaches back, over its tokens before the piece.
        need = [min(reach, run[0]) for run in pk.runs_before()]
        keep = [min(n, reach, t[0]) for n, t in zip(layout.lengths, pk.tail)]
    wire = max(keep[:-1], default=0)
    widest = max(need)
    packing = {} if pk is None else {"cu_seqlens": pk.local_cu_seqlens(u.device)}
    if widest == 0:  # kernel of one tap, a single piece, or no sequence crossing a piece boundary
        return ops.fftconv(u, k, D, None, pregate, postgate, activation, **packing)
    v = u if pregate is None else u * pregate
    n = keep[layout.position]
    tail = F.pad(v[..., v.shape[-1] - min(n, wire):], (wire - min(n, wire), 0))
    keep = [min(kp, wire) for kp in keep]
    (before,) = _comm.exchange(_halo_combine(layout.lengths, keep, widest), layout, "fftconv", tail)
    h = need[layout.position]
    if h == 0:
        return _comm.attach(ops.fftconv(u, k, D, None, pregate, postgate, activation, **packing), before)
    halo = before[..., widest - h:]
    ones = u.new_ones(u.shape[0], u.shape[1], h)
    u_ext = torch.cat([halo, u], dim=-1)
    pre = None if pregate is None else torch.cat([ones, pregate], dim=-1)
    post = None if postgate is None else torch.cat([ones, postgate], dim=-1)
    if pk is not None:
        # The halo joins the sequence the piece starts in: every offset after its start shifts by h.
        cu = packing["cu_seqlens"]
        entry = pk.first[layout.position][0]
        packing = {"cu_seqlens": torch.where(torch.arange(cu.shape[0], device=cu.device) > entry, cu + h, cu)}
    return ops.fftconv(u_ext, k, D, None, pre, post, activation, **packing)[..., h:]
