"""Collectives of context parallelism: the shard order, one metadata all-gather that validates the
call identically on every rank, and the differentiable exchange of small per-rank summaries.

Every collective of ``ssm_kernels.distributed`` goes through ``all_gather`` below, so the bytes
sent are counted in one place (``comm_stats``).
"""
from __future__ import annotations

import contextlib
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

MAX_DIMS = 6
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.complex128,
           torch.int32, torch.int64]
_DEVICE_TYPES = ["cpu", "cuda"]
# Per tensor: present, dtype code, device code, ndim, requires_grad, seqlen, then MAX_DIMS dims.
_TENSOR_FIELDS = 6 + MAX_DIMS


@dataclass
class CommStats:
    """Bytes this process passed to the collectives of ``ssm_kernels.distributed``.

    ``sent`` counts each all-gather's input tensor (what this rank contributes), ``received`` its
    output (group size x input); ``calls`` the number of all-gathers; ``log`` one
    ``(label, bytes_sent)`` per call.
    """
    sent: int = 0
    received: int = 0
    calls: int = 0
    log: list = field(default_factory=list)


_ACTIVE_STATS: list[CommStats] = []


@contextlib.contextmanager
def comm_stats():
    """Count the bytes of every collective made inside the block (forward and backward).

    Example:
        >>> with comm_stats() as stats:
        ...     loss = layer(x).sum(); loss.backward()
        >>> stats.sent
    """
    stats = CommStats()
    _ACTIVE_STATS.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE_STATS.remove(stats)


def all_gather(t: torch.Tensor, group, label: str) -> list[torch.Tensor]:
    """All-gather of one tensor (same shape and dtype on every rank), in group-rank order."""
    wire = torch.view_as_real(t) if t.is_complex() else t
    wire = wire.contiguous()
    out = [torch.empty_like(wire) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, wire, group=group)
    nbytes = wire.numel() * wire.element_size()
    for stats in _ACTIVE_STATS:
        stats.sent += nbytes
        stats.received += nbytes * len(out)
        stats.calls += 1
        stats.log.append((label, nbytes))
    if t.is_complex():
        out = [torch.view_as_complex(o) for o in out]
    return out


@dataclass
class Layout:
    """Where this rank's shard sits: ``order[p]`` is the group rank holding piece p."""
    group: object
    order: list[int]
    position: int
    lengths: list[int]  # shard length of each piece, by position
    needs_grad: bool = False  # some rank passed a tensor that requires grad

    @property
    def size(self) -> int:
        return len(self.order)

    @property
    def is_first(self) -> bool:
        return self.position == 0

    @property
    def is_last(self) -> bool:
        return self.position == self.size - 1

    @property
    def start(self) -> int:
        return sum(self.lengths[:self.position])


def _encode_tensor(t) -> list[int]:
    if not isinstance(t, torch.Tensor):
        return [0 if t is None else -1] + [0] * (_TENSOR_FIELDS - 1)
    dims = list(t.shape[:MAX_DIMS]) + [-1] * (MAX_DIMS - min(t.dim(), MAX_DIMS))
    dtype = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)
    device = _DEVICE_TYPES.index(t.device.type) if t.device.type in _DEVICE_TYPES else len(_DEVICE_TYPES)
    return [1, dtype, device, t.dim(), int(t.requires_grad and torch.is_grad_enabled()), 0] + dims


def _name(code: int, table: list) -> str:
    return str(table[code]) if 0 <= code < len(table) else "other"


def _describe(enc: list[int]) -> str:
    if enc[0] == 0:
        return "None"
    if enc[0] == -1:
        return "not a tensor"
    ndim = enc[3]
    dims = ["L" if d == -2 else str(d) for d in enc[6:6 + min(ndim, MAX_DIMS)]] + (["..."] if ndim > MAX_DIMS else [])
    return f"({', '.join(dims)}) {_name(enc[1], _DTYPES)} on {_name(enc[2], _DEVICE_TYPES)}"


def _seqlen_of(t: Optional[torch.Tensor], seq_dim: Optional[int]) -> int:
    if not isinstance(t, torch.Tensor) or seq_dim is None or t.dim() <= seq_dim or t.dim() + seq_dim < 0:
        return -1
    return t.shape[seq_dim]


def setup(op: str, process_group, shard_order: Optional[Sequence[int]], tensors: dict, options: dict,
          first_only: Optional[dict] = None, starts_at_end: bool = False) -> Layout:
    """Validate a context-parallel call identically on every rank and return this rank's layout.

    ``tensors`` maps argument name -> (tensor or None, seq_dim or None): tensors with a seq_dim
    are shards of the sequence (any length >= 1, the same on all of a rank's tensors); every other
    dimension, the dtype, the device and whether a gradient is wanted must agree on all ranks.
    ``first_only`` maps the names of tensors read on the first piece's rank only (initial
    states) to (expected shape, allowed dtypes): other ranks may pass None. The first piece is the
    last one with ``starts_at_end`` (a reverse recurrence). ``options`` (non-tensor arguments) must be equal
    on all ranks. One all-gather of a small int64 tensor carries everything, so every rank sees
    the same data and raises the same ValueError (naming the argument) before any other
    collective: an error never leaves a rank waiting.
    """
    group = dist.group.WORLD if process_group is None else process_group
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"process_group: {op} needs an initialized torch.distributed process group")
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"process_group: this process is not a member of the group given to {op}")
    order = list(range(size)) if shard_order is None else shard_order
    order_ok = isinstance(order, (list, tuple, torch.Tensor)) and all(
        (isinstance(o, int) and not isinstance(o, bool))
        or (isinstance(o, torch.Tensor) and o.numel() == 1 and not o.is_floating_point()) for o in order)
    order = [int(o) for o in order] if order_ok else []
    header = [rank, int(order_ok), len(order)] + (order + [-1] * size)[:size]
    body = []
    names = list(tensors)
    for name in names:
        t, seq_dim = tensors[name]
        enc = _encode_tensor(t)
        enc[5] = _seqlen_of(t, seq_dim)
        if enc[5] >= 0:
            enc[6 + (seq_dim % t.dim())] = -2  # the sequence dimension may differ between ranks
        body += enc
    opt_codes = [zlib.crc32(repr(options[k]).encode()) for k in options]
    # gloo gathers host tensors; NCCL needs device tensors (reading the result back then syncs
    # with the device once per call, a few hundred bytes).
    meta_device = "cpu" if dist.get_backend(group) == "gloo" else torch.device("cuda", torch.cuda.current_device())
    meta = torch.tensor(header + body + opt_codes, dtype=torch.int64, device=meta_device)
    gathered = [m.tolist() for m in all_gather(meta, group, f"{op}:meta")]
    return _validate(op, group, size, rank, gathered, names, list(options), first_only or {}, starts_at_end)


def _validate(op, group, size, rank, gathered, names, option_names, first_only, starts_at_end) -> Layout:
    head = 3 + size
    ranks_order = [g[3:head] for g in gathered]
    # shard_order
    for r, g in enumerate(gathered):
        if not g[1]:
            raise ValueError(f"shard_order: expected a sequence of ints on every rank; rank {r} passed another type")
        if g[2] != size:
            raise ValueError(f"process_group: has {size} ranks but rank {r} passed a shard_order of "
                             f"{g[2]} entries (expected a permutation of range({size}))")
    if any(o != ranks_order[0] for o in ranks_order):
        raise ValueError(f"shard_order: differs between ranks: {[tuple(o) for o in ranks_order]}")
    order = ranks_order[0]
    if sorted(order) != list(range(size)):
        raise ValueError(f"shard_order: expected a permutation of range({size}) (group rank of each piece), "
                         f"got {order}")
    first_rank = order[-1] if starts_at_end else order[0]
    lengths_by_rank = []
    for r, g in enumerate(gathered):
        seqlen = None
        for i, name in enumerate(names):
            enc = g[head + i * _TENSOR_FIELDS: head + (i + 1) * _TENSOR_FIELDS]
            if enc[0] == -1:
                raise ValueError(f"{name}: expected a tensor or None, rank {r} passed another type")
            if enc[0] == 1 and enc[5] >= 0:
                if seqlen is None:
                    seqlen = enc[5]
                elif enc[5] != seqlen:
                    raise ValueError(f"{name}: on rank {r} has seqlen {enc[5]}, the rank's other inputs "
                                     f"have {seqlen}")
        if seqlen is not None and seqlen < 1:
            raise ValueError(f"{names[0]}: rank {r} holds an empty shard (seqlen 0); every piece needs >= 1 step")
        lengths_by_rank.append(seqlen if seqlen is not None else 0)
    for i, name in enumerate(names):
        encs = [g[head + i * _TENSOR_FIELDS: head + (i + 1) * _TENSOR_FIELDS] for g in gathered]
        ref_rank = first_rank if name in first_only else 0
        ref = encs[ref_rank]
        if name in first_only and ref[0] == 1:
            shape, dtypes = first_only[name]
            got = tuple(ref[6:6 + min(ref[3], MAX_DIMS)])
            if ref[3] != len(shape) or got != tuple(shape) or _name(ref[1], _DTYPES) not in map(str, dtypes):
                raise ValueError(f"{name}: expected shape {tuple(shape)} with dtype in "
                                 f"{[str(d) for d in dtypes]} on rank {first_rank} (holding the piece "
                                 f"where the recurrence starts), got {_describe(ref)}")
        for r, enc in enumerate(encs):
            if name in first_only and r != first_rank:
                # Read on the first piece's rank only: others may pass None (or an ignored tensor
                # whose requires_grad does not matter).
                if enc[0] == 0 or ref[0] == 0 or (enc[:4] == ref[:4] and enc[6:] == ref[6:]):
                    continue
            if enc[:5] != ref[:5] or enc[6:] != ref[6:]:
                raise ValueError(f"{name}: rank {r} passed {_describe(enc)} but rank {ref_rank} passed "
                                 f"{_describe(ref)} (shapes other than seqlen, dtypes, devices and "
                                 f"requires_grad must agree on all ranks)")
    opt_base = head + len(names) * _TENSOR_FIELDS
    for j, opt in enumerate(option_names):
        values = [g[opt_base + j] for g in gathered]
        if any(v != values[0] for v in values):
            bad = next(r for r, v in enumerate(values) if v != values[0])
            raise ValueError(f"{opt}: differs between ranks (rank {bad} and rank 0 passed different values)")
    needs_grad = any(
        g[head + i * _TENSOR_FIELDS + 4] for r, g in enumerate(gathered) for i, name in enumerate(names)
        if name not in first_only or r == first_rank)
    lengths = [lengths_by_rank[order[p]] for p in range(size)]
    return Layout(group=group, order=order, position=order.index(rank), lengths=lengths, needs_grad=needs_grad)


def gather_by_position(t: torch.Tensor, layout: Layout, label: str) -> torch.Tensor:
    """[P, *t.shape]: every rank's tensor, indexed by piece position."""
    by_rank = all_gather(t, layout.group, label)
    return torch.stack([by_rank[r] for r in layout.order])


class _Exchange(torch.autograd.Function):
    """out = combine(gather(inputs))[position], differentiable.

    The backward all-gathers each rank's output gradient (the same size as the output) and every
    rank evaluates the vector-Jacobian product of the whole combine on its copy of the gathered
    inputs, keeping its own slice. combine is tiny (it runs over per-rank summaries), so the
    redundant local work is negligible; the communication is one all-gather each way.
    """

    @staticmethod
    def forward(ctx, combine, layout, label, grad_anchor, *inputs):
        # One all-gather for all inputs (they share a dtype): flatten, concatenate, split back.
        flat = torch.cat([t.reshape(-1) for t in inputs])
        rows = gather_by_position(flat, layout, f"{label}:fwd")  # [P, total]
        sizes = [t.numel() for t in inputs]
        gathered = [part.reshape((rows.shape[0],) + t.shape)
                    for part, t in zip(torch.split(rows, sizes, dim=1), inputs)]
        outs = combine(*gathered)
        ctx.combine, ctx.layout, ctx.label = combine, layout, label
        ctx.save_for_backward(*gathered)
        ctx.n_out = len(outs)
        return tuple(o[layout.position].clone() for o in outs)

    @staticmethod
    def backward(ctx, *grads):
        layout = ctx.layout
        all_grads = [gather_by_position(g.contiguous(), layout, f"{ctx.label}:bwd") for g in grads]
        leaves = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad():
            outs = ctx.combine(*leaves)
            in_grads = torch.autograd.grad(outs, leaves, all_grads, allow_unused=True)
        return (None, None, None, None) + tuple(None if g is None else g[layout.position] for g in in_grads)


def exchange(combine: Callable, layout: Layout, label: str, *inputs: torch.Tensor) -> tuple:
    """Differentiable: gather ``inputs`` (one dtype) from every rank, return ``combine(...)[position]``.

    combine maps the gathered tensors [P, ...] (by piece position) to a tuple of tensors [P, ...].
    When any rank needs gradients, every rank's output requires grad (through a zero-size anchor
    where no local input does), so every rank's backward reaches the matching all-gather.
    """
    anchor = None
    if layout.needs_grad and torch.is_grad_enabled() and not any(t.requires_grad for t in inputs):
        anchor = torch.zeros(0, requires_grad=True)
    return _Exchange.apply(combine, layout, label, anchor, *inputs)


class _Attach(torch.autograd.Function):
    """Identity on ``x`` that also routes a zero gradient to ``unused``.

    The first piece's rank does not use its own exchange output, but its backward must still run
    (the other ranks wait in its all-gather); attaching it to the local output keeps it in the
    graph at no cost.
    """

    @staticmethod
    def forward(ctx, x, unused):
        ctx.unused_meta = (unused.shape, unused.dtype, unused.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.unused_meta
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def attach(x: torch.Tensor, unused: torch.Tensor) -> torch.Tensor:
    if not (torch.is_grad_enabled() and unused.requires_grad):
        return x
    return _Attach.apply(x, unused)


@torch.compiler.disable
def check_pieces(process_group, op: str, **tensors: Optional[torch.Tensor]) -> Layout:
    """Validate a module's sequence inputs [B, L_r, ...] across the group before any local check
    can raise on one rank only (shapes but L_r, dtypes and devices must agree)."""
    specs = {name: (t, 1 if isinstance(t, torch.Tensor) and t.dim() >= 2 else None) for name, t in tensors.items()}
    return setup(op, process_group, None, specs, {})
