"""A Hyena-style long-convolution operator of order 2 (Poli et al., 2023, "Hyena Hierarchy:
Towards Larger Convolutional Language Models"), on causal_conv1d and fftconv."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

import ssm_kernels

from ..distributed import check_pieces, context_parallel_ops
from .mamba import MAX_CONV, MIN_CONV, check_positive_int


class Sin(nn.Module):
    """sin(freq * x) with a trainable per-feature frequency (Hyena's filter activation)."""

    def __init__(self, dim: int, w: float = 1.0, device=None, dtype=None):
        super().__init__()
        self.freq = nn.Parameter(w * torch.ones(1, dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class LongConv(nn.Module):
    """Hyena operator of order 2: a data-controlled gated long convolution.

        x0, x1, v = split(short_conv(in_proj(u)))         each [B, d_model, L]
        y = x0 * (h * (x1 * v) + bias * (x1 * v))          h: implicit long filter, causal
        out = out_proj(y)

    where the short conv is a depthwise causal conv of width ``short_filter_order`` (through
    ``causal_conv1d``) and the long convolution with both gates and the bias is one ``fftconv``
    call (``pregate=x1``, ``postgate=x0``, ``D=bias``). The filter ``h`` [d_model, L] is implicit:
    an MLP with sine activations of a positional encoding of t (t, and ``(emb_dim - 1) / 2``
    complex exponentials of frequencies up to l_max), times an exponential decay per channel
    ``exp(-t |delta_d|) + shift`` with rates spread between ``log(target)/fast_decay_pct`` and
    ``log(target)/slow_decay_pct`` (the Hyena paper's window).

    Parameters: ``in_proj`` Linear(D, 3D), ``short_filter`` Conv1d(3D, 3D, W, groups=3D),
    ``implicit_filter`` (Linear(emb_dim, F), Sin, Linear(F, F), Sin, Linear(F, F), Sin,
    Linear(F, D, bias=False)), ``bias`` [D], ``out_proj`` Linear(D, D); buffers ``pos_z``
    [1, l_max, emb_dim], ``pos_t`` [1, l_max, 1], ``deltas`` [D].

    Shapes:
        u [B, L, d_model] with L <= l_max -> [B, L, d_model]

    context_parallel_group: a torch.distributed group whose ranks each pass one piece of the
    sequence, in rank order (``ssm_kernels.distributed``; the filter then has l_max taps).
    With packed sequences, cu_seqlens holds the global offsets, the same on every rank.

    Packed sequences: ``forward(u, cu_seqlens=...)`` with u [1, L, d_model] and cu_seqlens
    [num_seqs + 1] int32/int64 runs each sequence as if alone (the short and the long convolution
    restart at each sequence's first token). Each sequence must be at most l_max long (not
    checked, which would synchronise with the device: taps past l_max do not exist), while the
    total L may exceed l_max.

    Raises:
        ValueError naming the argument: non-positive sizes, short_filter_order outside [2, 8],
        emb_dim not an odd int >= 3, bad decay settings, an input longer than l_max.

    Example:
        >>> op = LongConv(d_model=64, l_max=1024)
        >>> y = op(torch.randn(2, 1024, 64))
    """

    def __init__(self, d_model: int, l_max: int, filter_order: int = 64, emb_dim: int = 3,
                 short_filter_order: int = 3, w: float = 1.0, fast_decay_pct: float = 0.3,
                 slow_decay_pct: float = 1.5, target: float = 1e-2, shift: float = 0.0,
                 device=None, dtype=None, context_parallel_group=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.l_max = check_positive_int("l_max", l_max)
        self.filter_order = check_positive_int("filter_order", filter_order)
        if isinstance(emb_dim, bool) or not isinstance(emb_dim, int) or emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim: expected an odd int >= 3, got {emb_dim!r}")
        if isinstance(short_filter_order, bool) or not isinstance(short_filter_order, int) \
                or not MIN_CONV <= short_filter_order <= MAX_CONV:
            raise ValueError(f"short_filter_order: expected an int in [{MIN_CONV}, {MAX_CONV}], "
                             f"got {short_filter_order!r}")
        if not 0 < target < 1:
            raise ValueError(f"target: expected a float in (0, 1), got {target!r}")
        if not 0 < fast_decay_pct <= slow_decay_pct:
            raise ValueError(f"fast_decay_pct: expected 0 < fast_decay_pct <= slow_decay_pct={slow_decay_pct}, "
                             f"got {fast_decay_pct!r}")
        self.emb_dim = emb_dim
        self.short_filter_order = short_filter_order
        self.shift = shift
        self.context_parallel_group = context_parallel_group

        self.in_proj = nn.Linear(d_model, 3 * d_model, **factory_kwargs)
        self.short_filter = nn.Conv1d(3 * d_model, 3 * d_model, short_filter_order, groups=3 * d_model,
                                      padding=short_filter_order - 1, **factory_kwargs)
        order = filter_order
        self.implicit_filter = nn.Sequential(
            nn.Linear(emb_dim, order, **factory_kwargs), Sin(order, w, **factory_kwargs),
            nn.Linear(order, order, **factory_kwargs), Sin(order, w, **factory_kwargs),
            nn.Linear(order, order, **factory_kwargs), Sin(order, w, **factory_kwargs),
            nn.Linear(order, d_model, bias=False, **factory_kwargs),
        )
        self.bias = nn.Parameter(torch.randn(d_model, device=device))  # [D], float32
        self.out_proj = nn.Linear(d_model, d_model, **factory_kwargs)

        # Positional encoding of Hyena: t in [0, 1] and `bands` complex exponentials.
        bands = (emb_dim - 1) // 2
        t = torch.linspace(0, 1, l_max, dtype=torch.float64)[None, :, None]  # [1, l_max, 1]
        phase = 2 * math.pi * torch.arange(l_max, dtype=torch.float64)[None, :, None] / l_max
        f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None, None]
        z = torch.cat([t, torch.cos(f * phase), -torch.sin(f * phase)], dim=-1)  # exp(-i f phase)
        self.register_buffer("pos_z", z.to(device=device, dtype=dtype or torch.float32))
        self.register_buffer("pos_t", t.to(device=device, dtype=dtype or torch.float32))
        max_decay = math.log(target) / fast_decay_pct
        min_decay = math.log(target) / slow_decay_pct
        self.register_buffer("deltas", torch.linspace(min_decay, max_decay, d_model, device=device,
                                                      dtype=dtype or torch.float32))

    def filter(self, L: int) -> torch.Tensor:
        """The implicit long filter h: [d_model, L] in the layer's dtype."""
        if isinstance(L, bool) or not isinstance(L, int) or not 1 <= L <= self.l_max:
            raise ValueError(f"L: expected an int in [1, l_max={self.l_max}], got {L!r}")
        h = self.implicit_filter(self.pos_z[:, :L])  # [1, L, D]
        decay = torch.exp(-self.pos_t[:, :L] * self.deltas.abs())  # [1, L, D]
        return (h * (decay + self.shift))[0].transpose(0, 1)  # [D, L]

    def forward(self, u: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.context_parallel_group is not None:
            check_pieces(self.context_parallel_group, "LongConv", u=u, cu_seqlens=cu_seqlens)
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u: expected shape (batch, seqlen, d_model={self.d_model}), got {tuple(u.shape)}")
        seqlen = u.shape[1]
        if cu_seqlens is None and seqlen > self.l_max:
            raise ValueError(f"u: expected seqlen <= l_max={self.l_max}, got {seqlen}")
        conv1d, fftconv, taps = ssm_kernels.causal_conv1d, ssm_kernels.fftconv, min(seqlen, self.l_max)
        packing = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        if self.context_parallel_group is not None:
            conv1d, fftconv = context_parallel_ops(self.context_parallel_group, "causal_conv1d", "fftconv")
            taps = self.l_max  # the global length is not known here; taps past it are never used
        uc = conv1d(self.in_proj(u).transpose(1, 2), self.short_filter.weight.squeeze(1),
                    self.short_filter.bias, **packing)  # [B, 3D, L]
        x0, x1, v = uc.split(self.d_model, dim=1)
        kdtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        y = fftconv(v, self.filter(taps).to(kdtype), D=self.bias.to(kdtype),
                    pregate=x1, postgate=x0, **packing)  # [B, D, L]
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, l_max={self.l_max}, filter_order={self.filter_order}, "
                f"emb_dim={self.emb_dim}, short_filter_order={self.short_filter_order}")
