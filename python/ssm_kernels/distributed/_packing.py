"""Packed sequences under context parallelism: which sequence every piece starts and ends in.

Two forms, as for the single-process ops: ``seq_idx`` [B, L_r] int32, this rank's slice of the
global seq_idx (non-decreasing along the whole row, across the pieces in shard order), or
``cu_seqlens`` [S + 1], the global offsets, identical on every rank (per-sequence states). Either
way every rank ends up with the same table: for each piece and row, the sequence of its first and
last token and how many of its last tokens belong to that last sequence. With seq_idx the table
comes from one all-gather of [B, 4] int64 per rank (it also carries whether the piece is
non-decreasing, so a bad seq_idx raises the same ValueError on every rank); with cu_seqlens it is
computed from the offsets, which the metadata all-gather has already checked to be equal.
"""
from __future__ import annotations

import bisect
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import _comm

_INT = (torch.int32, torch.int64)


def cu_seqlens_code(cu_seqlens) -> int:
    """A CRC of the offsets' values, compared across ranks by the metadata all-gather (one host
    read of S + 1 integers)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.dtype not in _INT:
        return -1
    return zlib.crc32(repr(cu_seqlens.tolist()).encode())


@dataclass
class Packing:
    """The sequences of the row around this rank's piece (all lists indexed by piece position)."""
    layout: _comm.Layout
    seq_idx: torch.Tensor  # [B, L_r] int32: the global sequence of every token of this piece
    offsets: Optional[list]  # the global cu_seqlens (cu_seqlens form), else None
    first: list  # [P][B]: sequence of the piece's first token
    last: list  # [P][B]: sequence of its last token
    tail: list  # [P][B]: how many of its last tokens belong to that sequence

    @property
    def per_sequence(self) -> bool:
        return self.offsets is not None

    @property
    def num_seqs(self) -> int:
        return len(self.offsets) - 1

    def enters(self, p: int, reverse: bool = False) -> list:
        """[B] bools: the recurrence enters piece p inside the sequence it left the piece before
        (in recurrence order), so the incoming state continues; otherwise it must not leak in."""
        if reverse:
            return [False] * len(self.last[p]) if p == len(self.first) - 1 else \
                [lo == hi for lo, hi in zip(self.last[p], self.first[p + 1])]
        return [False] * len(self.first[p]) if p == 0 else \
            [lo == hi for lo, hi in zip(self.first[p], self.last[p - 1])]

    def passes(self, p: int, reverse: bool = False) -> list:
        """[B] bools: piece p lies inside one sequence that continues into it, so the incoming
        state passes through the whole piece (its decay multiplies it)."""
        return [e and f == l for e, f, l in zip(self.enters(p, reverse), self.first[p], self.last[p])]

    def mask(self, flags: list, like: torch.Tensor, ndim: int) -> torch.Tensor:
        """flags [B] as a bool tensor [B, 1, ...] of ndim dims on like's device."""
        return torch.tensor(flags, dtype=torch.bool, device=like.device).view((-1,) + (1,) * (ndim - 1))

    def local_cu_seqlens(self, device) -> torch.Tensor:
        """[S + 1] int32: the global offsets clipped to this piece (sequences outside it are empty)."""
        start, n = self.layout.start, self.layout.lengths[self.layout.position]
        return torch.tensor([min(max(o - start, 0), n) for o in self.offsets], dtype=torch.int32, device=device)

    def owned(self, reverse: bool = False) -> list:
        """[S] bools: the sequences whose final state this piece produces (the piece holding a
        sequence's last token in recurrence order; an empty sequence's, that holding its offset,
        the last piece for an offset at the end of the row)."""
        start = self.layout.start
        stop = start + self.layout.lengths[self.layout.position]
        total = sum(self.layout.lengths)
        out = []
        for lo, hi in zip(self.offsets[:-1], self.offsets[1:]):
            if lo == hi:
                out.append(start <= lo < stop or (lo == total and self.layout.is_last))
            else:
                end = lo if reverse else hi - 1
                out.append(start <= end < stop)
        return out

    def runs_before(self) -> list:
        """[P][B]: how many tokens of the sequence of piece p's first token lie before the piece
        (0 where the piece starts a sequence)."""
        runs, prev = [], [0] * len(self.first[0])
        for p in range(len(self.first)):
            enters = self.enters(p)
            runs.append([r if e else 0 for r, e in zip(prev, enters)])
            n = self.layout.lengths[p]
            prev = [r + n if e and f == l else t
                    for r, e, f, l, t in zip(runs[p], enters, self.first[p], self.last[p], self.tail[p])]
        return runs


def setup(op: str, layout: _comm.Layout, seq_idx, cu_seqlens, batch: int, device) -> Optional[Packing]:
    """The packing table of a context-parallel call, after _comm.setup has checked that every rank
    passed the same kind, dtype and shape of seq_idx / cu_seqlens (and the same offsets). Every
    rank raises the same ValueError for bad values, before any other collective. device: that of
    the sequence tensors (the local seq_idx derived from cu_seqlens lives there)."""
    if seq_idx is None and cu_seqlens is None:
        return None
    if seq_idx is not None and cu_seqlens is not None:
        raise ValueError("cu_seqlens: expected at most one of cu_seqlens and seq_idx, got both")
    lengths = layout.lengths
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype not in _INT:
            raise ValueError(f"cu_seqlens: expected an int32/int64 tensor of shape (num_seqs + 1,), got "
                             f"shape {tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
        if batch != 1:
            raise ValueError(f"cu_seqlens: expected batch 1 (sequences packed into one row), got batch {batch}")
        offsets = cu_seqlens.tolist()
        total = sum(lengths)
        if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to the total length {total} "
                             f"of the pieces, got {offsets}")
        ends = offsets[1:]
        first, last, tail = [], [], []
        for p in range(layout.size):
            start = sum(lengths[:p])
            stop = start + lengths[p]
            s_first = bisect.bisect_right(ends, start)  # the sequence whose end is the first offset > start
            s_last = bisect.bisect_right(ends, stop - 1)
            first.append([s_first])
            last.append([s_last])
            tail.append([stop - max(start, offsets[s_last])])
        start = layout.start
        pos = torch.arange(start, start + lengths[layout.position], device=cu_seqlens.device)
        local = torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True).to(device, torch.int32)[None]
        return Packing(layout, local, offsets, first, last, tail)
    if seq_idx.dtype != torch.int32 or seq_idx.dim() != 2 or seq_idx.shape[0] != batch:
        raise ValueError(f"seq_idx: expected an int32 tensor of shape (batch={batch}, seqlen), got shape "
                         f"{tuple(seq_idx.shape)} {seq_idx.dtype}")
    rising = (seq_idx[:, 1:] >= seq_idx[:, :-1]).all(1)  # [B]
    tail = (seq_idx == seq_idx[:, -1:]).sum(1)
    ends = torch.stack([seq_idx[:, 0].long(), seq_idx[:, -1].long(), tail.long(), rising.long()], dim=1)  # [B, 4]
    if dist.get_backend(layout.group) == "gloo":
        ends = ends.cpu()
    rows = _comm.gather_by_position(ends, layout, f"{op}:seq_idx")
    table = rows.tolist()  # [P][B][4]
    for p, piece in enumerate(table):
        for b, (f, _, _, ok) in enumerate(piece):
            if not ok:
                raise ValueError(f"seq_idx: decreases inside the piece of rank {layout.order[p]} (row {b}); "
                                 f"expected non-decreasing along the whole row")
            if p > 0 and f < table[p - 1][b][1]:
                raise ValueError(f"seq_idx: decreases across pieces: row {b} ends with sequence "
                                 f"{table[p - 1][b][1]} on rank {layout.order[p - 1]} (piece {p - 1}) but starts "
                                 f"with {f} on rank {layout.order[p]} (piece {p}); expected non-decreasing "
                                 f"along the whole row in shard order")
    return Packing(layout, seq_idx, None, [[r[0] for r in piece] for piece in table],
                   [[r[1] for r in piece] for piece in table], [[r[2] for r in piece] for piece in table])

