"""The Mamba-1 mixer (Gu and Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"), on the selective-scan and causal-conv1d kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssm_kernels

from ..distributed import check_pieces, context_parallel_ops

MIN_CONV, MAX_CONV = 2, 8  # the widths causal_conv1d supports


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def check_conv_width(d_conv) -> int:
    if isinstance(d_conv, bool) or not isinstance(d_conv, int) or not MIN_CONV <= d_conv <= MAX_CONV:
        raise ValueError(f"d_conv: expected an int in [{MIN_CONV}, {MAX_CONV}], got {d_conv!r}")
    return d_conv


def step_batch(hidden_states: torch.Tensor, d_model: int) -> int:
    """The batch size of a decode step's hidden_states, which must be [B, 1, d_model]."""
    if hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or hidden_states.shape[2] != d_model:
        raise ValueError(f"hidden_states: expected shape (batch, 1, d_model={d_model}), "
                         f"got {tuple(hidden_states.shape)}")
    return hidden_states.shape[0]


def check_dt_range(dt_min, dt_max, dt_init_floor) -> None:
    if not (isinstance(dt_min, (int, float)) and dt_min > 0):
        raise ValueError(f"dt_min: expected a positive float, got {dt_min!r}")
    if not (isinstance(dt_max, (int, float)) and dt_max >= dt_min):
        raise ValueError(f"dt_max: expected a float >= dt_min={dt_min}, got {dt_max!r}")
    if not (isinstance(dt_init_floor, (int, float)) and dt_init_floor >= 0):
        raise ValueError(f"dt_init_floor: expected a float >= 0, got {dt_init_floor!r}")


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, device=None) -> torch.Tensor:
    """[n] float32 biases b with softplus(b) log-uniform in [dt_min, dt_max] (floored)."""
    dt = torch.exp(torch.rand(n, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^{-1}(dt)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan kernels keep the recurrent state in float32 (float64 for float64 layers)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def conv_state_after(conv_state: torch.Tensor, x: torch.Tensor, final_states: torch.Tensor,
                     seq_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """The last S conv inputs after a chunk x [B, D, L] that follows conv_state [B, D, S].

    The last W-1 come from causal_conv1d's final_states; slots older than the conv window (when
    S > W-1, as in mamba_ssm's caches) take the inputs at those positions, zeroed with seq_idx
    where they belong to another sequence than the last position.
    """
    state_len, keep = conv_state.shape[-1], final_states.shape[-1]
    if state_len == keep:
        return final_states
    history = torch.cat([conv_state.to(x.dtype), x], dim=-1)[..., -state_len:-keep]  # [B, D, S-W+1]
    if seq_idx is not None:
        seqlen = x.shape[-1]
        pos = torch.arange(seqlen - state_len, seqlen - keep, device=x.device).clamp(min=0)
        same = (seq_idx[:, pos] == seq_idx[:, -1:]).to(x.dtype)  # [B, S-W+1]
        history = history * same[:, None, :]
    return torch.cat([history, final_states], dim=-1)


def packed_conv_state_after(conv_state: torch.Tensor, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The last S conv inputs of each packed sequence of x [1, D, L] that follows its row of
    conv_state [num_seqs, D, S] (which fills in for a sequence shorter than S): [num_seqs, D, S]."""
    num_seqs, dim, state_len = conv_state.shape
    seqlen = x.shape[-1]
    off = cu_seqlens.to(device=x.device, dtype=torch.int64)
    start, end = off[:-1, None], off[1:, None]  # [S, 1]
    pos = end - state_len + torch.arange(state_len, device=x.device)  # [S, state_len]
    own = torch.arange(num_seqs, device=x.device)[:, None] * state_len
    # columns of cat(x row, the states' slots): a token of the sequence, or its state's slot
    src = torch.where(pos >= start, pos, seqlen + own + state_len + pos - start)
    slots = conv_state.to(x.dtype).permute(1, 0, 2).reshape(dim, num_seqs * state_len)
    table = torch.cat([x[0], slots], dim=-1)  # [D, L + S * state_len]
    return table[:, src.reshape(-1)].view(dim, num_seqs, state_len).permute(1, 0, 2)


def conv_with_state_taps(weight: torch.Tensor, conv_state: torch.Tensor, dtype: torch.dtype):
    """For per-sequence conv states under context parallelism, where a sequence's last inputs may
    lie on earlier ranks: weight [D, W] widened with zero taps in front to S + 1 (S = conv_state's
    length), and the initial states conv_state [N, D, S]. The conv's output is unchanged and its
    final states are then each sequence's last S inputs, gathered by the op's own halo exchange."""
    state_len = conv_state.shape[-1]
    if state_len + 1 > MAX_CONV:
        raise ValueError(f"conv_state: per-sequence states under context parallelism need a state length of at "
                         f"most {MAX_CONV - 1}, got {state_len}")
    wide = torch.cat([weight.new_zeros(weight.shape[0], state_len + 1 - weight.shape[1]), weight], dim=1)
    return wide, conv_state.to(dtype)


def conv_inputs(weight: torch.Tensor, conv_state: Optional[torch.Tensor], x: torch.Tensor, rows: int,
                per_sequence_cp: bool):
    """The layer conv's weight and initial states for x [B, D, L], and the conv state it continues
    from. per_sequence_cp: per-sequence states are wanted under context parallelism (see
    conv_with_state_taps; conv_state then defaults to zeros of the conv's width)."""
    width = weight.shape[1]
    if per_sequence_cp:
        if conv_state is None:
            conv_state = x.new_zeros(rows, x.shape[1], width)
        return (*conv_with_state_taps(weight, conv_state, x.dtype), conv_state)
    init = None if conv_state is None else conv_state[..., -(width - 1):].to(x.dtype)
    return weight, init, conv_state


def conv_state_out(conv_state: Optional[torch.Tensor], x: torch.Tensor, final_conv: torch.Tensor, width: int,
                   rows: int, cu_seqlens, seq_idx, per_sequence_cp: bool) -> torch.Tensor:
    """The conv state after x [B, D, L] (see conv_inputs), per sequence with cu_seqlens."""
    if per_sequence_cp:
        return final_conv
    if conv_state is None:
        conv_state = x.new_zeros(rows, x.shape[1], width)
    if cu_seqlens is not None:
        return packed_conv_state_after(conv_state, x, cu_seqlens)
    return conv_state_after(conv_state, x, final_conv, seq_idx)


def states_from_cache(module: nn.Module, inference_params, batch_size: int):
    """mamba_ssm's cache protocol: inference_params.key_value_memory_dict[layer_idx]."""
    if module.layer_idx is None:
        raise ValueError("layer_idx: expected an int when decoding with inference_params, got None")
    cache = inference_params.key_value_memory_dict
    if module.layer_idx not in cache:
        cache[module.layer_idx] = module.allocate_inference_cache(batch_size, inference_params.max_seqlen)
    return cache[module.layer_idx]


class Mamba(nn.Module):
    """Mamba-1 mixer: in_proj -> causal conv + SiLU -> x_proj -> dt_proj -> selective scan with
    z gating -> out_proj.

    Constructor arguments, parameter names, shapes and initialisation are those of
    ``mamba_ssm.modules.mamba_simple.Mamba``, so a state_dict saved from it (or from Hugging Face
    transformers' ``MambaMixer``) loads with ``strict=True``:

        in_proj   Linear(d_model, 2 * d_inner, bias=bias)         x and z
        conv1d    Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)
        x_proj    Linear(d_inner, dt_rank + 2 * d_state, bias=False)  dt, B, C
        dt_proj   Linear(dt_rank, d_inner, bias=True)
        A_log     [d_inner, d_state]  (A = -exp(A_log), S4D-real init A[:, n] = -(n + 1))
        D         [d_inner]
        out_proj  Linear(d_inner, d_model, bias=bias)

    with ``d_inner = int(expand * d_model)`` and ``dt_rank = ceil(d_model / 16)`` for "auto".

    Args:
        d_model: model width; d_state: SSM state size N; d_conv: conv width (2..8); expand.
        dt_rank: "auto" or a positive int. dt_min, dt_max, dt_init_floor: softplus(dt_proj.bias)
            is initialised log-uniform in [dt_min, dt_max], floored at dt_init_floor.
        dt_init: "random" (uniform +-dt_rank^-0.5 * dt_scale) or "constant" init of dt_proj.weight.
        conv_bias, bias: biases of conv1d and of in_proj/out_proj.
        use_fast_path: accepted for compatibility (the kernels are always used).
        layer_idx: this layer's key in a mamba_ssm ``inference_params`` cache.
        context_parallel_group: a torch.distributed group whose ranks each pass one piece of the
            sequence, in rank order (``ssm_kernels.distributed``; also settable as an attribute).
            With packed sequences, seq_idx is this rank's piece of the global seq_idx and
            cu_seqlens the global offsets, the same on every rank; the per-sequence states (initial
            and returned) are then as for the context-parallel ops: each returned row filled on the
            rank holding the sequence's end and zero on the others (their sum over the group is
            the single-process result). No inference_params then.

    Forward:
        hidden_states [B, L, d_model] -> out [B, L, d_model] (the dtype of the layer).
        With ``conv_state`` [B, d_inner, S >= d_conv-1] and ``ssm_state`` [B, d_inner, d_state]
        the sequence continues from those states; with ``return_final_states=True`` the call
        returns ``(out, conv_state, ssm_state)`` with the states after the last position (new
        tensors, differentiable), so a long sequence can be processed in pieces.
        ``inference_params`` follows mamba_ssm's generation protocol (prefill, then ``step``).

    Packed sequences (API.md: packed sequences): ``cu_seqlens`` [S + 1] (batch 1) runs every
    sequence hidden_states[:, cu_seqlens[s]:cu_seqlens[s + 1]] on its own, as separate calls
    would; ``ssm_state`` is then per sequence [S, d_inner, d_state] and the returned states are
    ``conv_state`` [S, d_inner, d_conv] and ``ssm_state`` [S, d_inner, d_state] (ready for
    ``step`` on a batch of S); an initial ``conv_state`` is then per sequence too,
    [S, d_inner, S_conv >= d_conv-1]. ``seq_idx`` [B, L] int32 (non-decreasing) instead
    restarts the conv and the scan where the index changes, with the states of each row's first
    and last sequence as without it.

    Decoding: ``allocate_inference_cache(batch_size, max_seqlen)`` gives zero states
    ``conv_state`` [B, d_inner, d_conv] and ``ssm_state`` [B, d_inner, d_state] (float32, or
    float64 for a float64 layer); ``step(hidden_states [B, 1, d_model], conv_state, ssm_state)``
    updates both in place and returns ``(out [B, 1, d_model], conv_state, ssm_state)``.

    Raises:
        ValueError naming the argument for a non-positive size, d_conv outside [2, 8], an unknown
        dt_init, or a bad dt range.

    Example:
        >>> layer = Mamba(d_model=64)
        >>> y = layer(torch.randn(2, 100, 64))
        >>> conv_state, ssm_state = layer.allocate_inference_cache(2, 100)
        >>> y1, _, _ = layer.step(torch.randn(2, 1, 64), conv_state, ssm_state)
    """

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001,
                 dt_max=0.1, dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True,
                 bias=False, use_fast_path=True, layer_idx=None, device=None, dtype=None,
                 context_parallel_group=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_conv_width(d_conv)
        if not isinstance(expand, (int, float)) or isinstance(expand, bool) or expand <= 0:
            raise ValueError(f"expand: expected a positive number, got {expand!r}")
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        if self.d_inner < 1:
            raise ValueError(f"expand: expected expand * d_model >= 1, got {expand} * {d_model}")
        if dt_rank == "auto":
            self.dt_rank = math.ceil(self.d_model / 16)
        else:
            self.dt_rank = check_positive_int("dt_rank", dt_rank)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
        check_dt_range(dt_min, dt_max, dt_init_floor)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.activation = "silu"
        self.context_parallel_group = context_parallel_group

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt_proj keeps the variance of dt at initialisation (mamba_ssm's scheme).
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        else:
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        with torch.no_grad():
            self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, device))
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation: A[:, n] = -(n + 1).
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # [D, N]
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # [D]
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # [D, W]

    def forward(self, hidden_states: torch.Tensor, inference_params=None, *,
                conv_state: Optional[torch.Tensor] = None, ssm_state: Optional[torch.Tensor] = None,
                return_final_states: bool = False, cu_seqlens: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None):
        if self.context_parallel_group is not None:
            check_pieces(self.context_parallel_group, "Mamba", hidden_states=hidden_states, seq_idx=seq_idx,
                         cu_seqlens=cu_seqlens)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states: expected shape (batch, seqlen, d_model={self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        packing = dict(cu_seqlens=cu_seqlens, seq_idx=seq_idx)
        if inference_params is not None:
            if cu_seqlens is not None or seq_idx is not None:
                raise ValueError("cu_seqlens: packed sequences are not supported with inference_params")
            cache_conv, cache_ssm = states_from_cache(self, inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, cache_conv, cache_ssm)
                return out
            # Prefill starts from zero states, like mamba_ssm, and leaves its final states in the cache.
            out, new_conv, new_ssm = self._forward(hidden_states, torch.zeros_like(cache_conv), None, True)
            with torch.no_grad():
                cache_conv.copy_(new_conv)
                cache_ssm.copy_(new_ssm)
            return out
        out, new_conv, new_ssm = self._forward(hidden_states, conv_state, ssm_state, return_final_states,
                                               **packing)
        return (out, new_conv, new_ssm) if return_final_states else out

    def _check_packing(self, batch: int, cu_seqlens, seq_idx, conv_state) -> int:
        """The batch of the states: num_seqs with cu_seqlens (the ops check the offsets)."""
        if cu_seqlens is None:
            return batch
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens: expected a tensor of shape (num_seqs + 1,), got {cu_seqlens!r}")
        if seq_idx is not None:
            raise ValueError("cu_seqlens: expected at most one of cu_seqlens and seq_idx, got both")
        if batch != 1:
            raise ValueError(f"cu_seqlens: expected batch 1 (sequences packed into one row), got batch {batch}")
        return cu_seqlens.shape[0] - 1

    def _check_states(self, batch: int, conv_state, ssm_state) -> None:
        if conv_state is not None and (conv_state.dim() != 3 or conv_state.shape[:2] != (batch, self.d_inner)
                                       or conv_state.shape[2] < self.d_conv - 1):
            raise ValueError(f"conv_state: expected shape (batch={batch}, d_inner={self.d_inner}, "
                             f">= {self.d_conv - 1}), got {tuple(conv_state.shape)}")
        if ssm_state is not None and tuple(ssm_state.shape) != (batch, self.d_inner, self.d_state):
            raise ValueError(f"ssm_state: expected shape ({batch}, {self.d_inner}, {self.d_state}), "
                             f"got {tuple(ssm_state.shape)}")

    def _forward(self, hidden_states, conv_state, ssm_state, want_states, cu_seqlens=None, seq_idx=None):
        batch, seqlen, _ = hidden_states.shape
        state_batch = self._check_packing(batch, cu_seqlens, seq_idx, conv_state)
        self._check_states(state_batch, conv_state, ssm_state)
        xz = self.in_proj(hidden_states)  # [B, L, 2D]
        x, z = xz.chunk(2, dim=-1)
        x = x.transpose(1, 2)  # [B, D, L] (channel-last view)
        z = z.transpose(1, 2)  # [B, D, L]
        cp_states = want_states and cu_seqlens is not None and self.context_parallel_group is not None
        weight, init_conv, conv_state = conv_inputs(self._conv_weight(), conv_state, x, state_batch, cp_states)
        conv1d, selective_scan = ssm_kernels.causal_conv1d, ssm_kernels.selective_scan
        if self.context_parallel_group is not None:
            conv1d, selective_scan = context_parallel_ops(self.context_parallel_group, "causal_conv1d",
                                                          "selective_scan")
        packing = {k: v for k, v in (("cu_seqlens", cu_seqlens), ("seq_idx", seq_idx)) if v is not None}
        xc, final_conv = conv1d(x, weight, self.conv1d.bias, "silu",
                                initial_states=init_conv, return_final_states=True, **packing)
        x_dbl = self.x_proj(xc.transpose(1, 2))  # [B, L, R + 2N]
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # [B, D, L]
        A = -torch.exp(self.A_log.float())  # [D, N]
        sd = state_dtype(xc.dtype)
        y, last_state = selective_scan(
            xc, dt, A.to(sd), B.transpose(1, 2), C.transpose(1, 2), D=self.D.to(sd), z=z,
            delta_bias=self.dt_proj.bias.to(sd), delta_softplus=True,
            initial_state=None if ssm_state is None else ssm_state.to(sd), return_last_state=True, **packing)
        out = self.out_proj(y.transpose(1, 2))  # [B, L, d_model]
        if not want_states:
            return out, None, None
        return out, conv_state_out(conv_state, x, final_conv, self.d_conv, state_batch, cu_seqlens, seq_idx,
                                   cp_states), last_state

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decode step: hidden_states [B, 1, d_model]; updates conv_state and ssm_state in place."""
        self._check_states(step_batch(hidden_states, self.d_model), conv_state, ssm_state)
        xz = self.in_proj(hidden_states.squeeze(1))  # [B, 2D]
        x, z = xz.chunk(2, dim=-1)  # [B, D] each
        x = ssm_kernels.causal_conv1d_update(x, conv_state, self._conv_weight(), self.conv1d.bias, "silu")
        x_db = self.x_proj(x)  # [B, R + 2N]
        dt, B, C = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # [B, D]
        sd = ssm_state.dtype
        A = -torch.exp(self.A_log.to(sd))  # [D, N]
        y = ssm_kernels.selective_state_update(ssm_state, x, dt, A, B, C, D=self.D.to(sd), z=z,
                                               dt_bias=self.dt_proj.bias.to(sd), dt_softplus=True)
        out = self.out_proj(y)  # [B, d_model]
        return out.unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero (conv_state [B, d_inner, d_conv], ssm_state [B, d_inner, d_state]) for ``step``."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=state_dtype(self.dt_proj.weight.dtype))
        return conv_state, ssm_state
