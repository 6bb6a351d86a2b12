"""Packed variable-length sequences (API.md: packed sequences): conversions between a list of
sequences, a padded batch with an attention mask, and the packed form the ops take.

The packed form of S sequences is one row (batch 1) of T = sum of their lengths tokens, and
``cu_seqlens`` [S + 1] (int32): sequence s is tokens cu_seqlens[s]:cu_seqlens[s + 1] of the row.
An empty sequence has equal neighbouring offsets. Every conversion here is differentiable in the
values it moves.

Host syncs: ``cu_seqlens_to_seq_idx`` runs on the device without one. Packing from a padded batch
and unpacking into a list produce tensors whose shapes depend on the lengths, so they read the
lengths on the host (one sync each on CUDA); do them once per batch, outside the model.

Example:
    >>> seqs = [torch.randn(5, 8), torch.randn(0, 8), torch.randn(3, 8)]  # [L_i, H]
    >>> packed, cu_seqlens = pack(seqs)         # [1, 8, H], tensor([0, 5, 5, 8])
    >>> back = unpack(packed, cu_seqlens)       # [5, H], [0, H], [3, H]
    >>> x, mask = torch.randn(2, 6, 8), torch.tensor([[1] * 6, [1] * 4 + [0] * 2]).bool()
    >>> packed, cu_seqlens = pad_to_packed(x, mask)  # [1, 10, 8], tensor([0, 6, 10])
    >>> y = packed_to_pad(packed, mask)         # [2, 6, 8], zeros where mask is False
"""
from __future__ import annotations

from typing import List, Sequence

import torch

__all__ = [
    "pack",
    "unpack",
    "pad_to_packed",
    "packed_to_pad",
    "lengths_to_cu_seqlens",
    "cu_seqlens_to_seq_idx",
]


def lengths_to_cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    """[S] sequence lengths (any integer dtype, >= 0) -> cu_seqlens [S + 1] int32, on their device."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.is_floating_point():
        raise ValueError(f"lengths: expected a 1-D integer tensor, got {lengths!r}")
    zero = torch.zeros(1, dtype=torch.int32, device=lengths.device)
    return torch.cat([zero, torch.cumsum(lengths, 0).to(torch.int32)])


def cu_seqlens_to_seq_idx(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """cu_seqlens [S + 1] -> seq_idx [1, seqlen] int32: the sequence of every token of the packed
    row (empty sequences get no token). Runs on cu_seqlens' device without a host sync."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected a tensor of shape (num_seqs + 1,), got {cu_seqlens!r}")
    pos = torch.arange(seqlen, device=cu_seqlens.device)
    # Token t belongs to the sequence whose end is the first offset > t.
    return torch.searchsorted(cu_seqlens[1:].to(torch.int64), pos, right=True).to(torch.int32)[None]


def _seq_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim: expected a dim of the sequences (ndim {ndim}), got {dim}")
    return dim % ndim


def pack(seqs: Sequence[torch.Tensor], dim: int = 0):
    """Concatenates sequences along their time axis `dim` into one packed row.

    Args:
        seqs: S >= 1 tensors of the same dtype, device and shape except along `dim` (any length,
            0 included); e.g. [L_i, H] for the layers (dim=0) or [D, L_i] for the ops (dim=-1).
        dim: the time axis of each sequence.

    Returns:
        (packed, cu_seqlens): packed is the concatenation with a new leading batch axis of 1
        ([1, T, H] or [1, D, T]); cu_seqlens [S + 1] int32 on the sequences' device.
    """
    seqs = list(seqs)
    if not seqs or not all(isinstance(s, torch.Tensor) for s in seqs):
        raise ValueError("seqs: expected a non-empty list of tensors")
    d = _seq_dim(dim, seqs[0].dim())
    lengths = torch.tensor([s.shape[d] for s in seqs], dtype=torch.int64)
    packed = torch.cat(seqs, dim=d).unsqueeze(0)
    return packed, lengths_to_cu_seqlens(lengths).to(seqs[0].device)


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, dim: int = 1) -> List[torch.Tensor]:
    """The inverse of `pack`: packed [1, ...] with its time axis `dim` (1 for [1, T, H], -1 for
    [1, D, T]) -> the S sequences (views), without the batch axis. Reads cu_seqlens on the host."""
    if packed.dim() < 2 or packed.shape[0] != 1:
        raise ValueError(f"packed: expected a batch of 1 and a time axis, got shape {tuple(packed.shape)}")
    d = _seq_dim(dim, packed.dim())
    if d == 0:
        raise ValueError("dim: expected the time axis, not the batch axis 0")
    offsets = cu_seqlens.tolist()
    row = packed[0]
    return [row.narrow(d - 1, start, end - start) for start, end in zip(offsets[:-1], offsets[1:])]


def pad_to_packed(x: torch.Tensor, mask: torch.Tensor):
    """A padded batch x [B, L, ...] and its attention mask [B, L] (True/1 = a token, anywhere in
    the row; order kept) -> (packed [1, T, ...], cu_seqlens [B + 1] int32), one sequence per row
    (rows without tokens give empty sequences). Reads the token count on the host."""
    mask = _check_mask(x, mask)
    packed = x[mask].unsqueeze(0)  # [1, T, ...]
    return packed, lengths_to_cu_seqlens(mask.sum(1))


def packed_to_pad(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of `pad_to_packed`: packed [1, T, ...] -> [B, L, ...] with the tokens where mask
    is True and zeros elsewhere."""
    if packed.dim() < 2 or packed.shape[0] != 1:
        raise ValueError(f"packed: expected shape (1, T, ...), got {tuple(packed.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"mask: expected a (batch, seqlen) tensor, got {mask!r}")
    mask = mask.to(device=packed.device, dtype=torch.bool)
    out = packed.new_zeros((*mask.shape, *packed.shape[2:]))
    return out.index_put((mask,), packed[0])


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"mask: expected shape (batch, seqlen) = {tuple(x.shape[:2])}, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else mask!r}")
    return mask.to(device=x.device, dtype=torch.bool)
