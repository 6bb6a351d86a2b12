"""The Mamba-2 mixer (Dao and Gu, 2024, "Transformers are SSMs: Generalized Models and Efficient
Algorithms Through Structured State Space Duality"), on the causal-conv1d and SSD kernels."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssm_kernels

from ..distributed import check_pieces, context_parallel_ops
from .mamba import (
    check_conv_width,
    check_dt_range,
    check_positive_int,
    conv_inputs,
    conv_state_out,
    inverse_softplus_dt,
    state_dtype,
    states_from_cache,
    step_batch,
)
from .norm import RMSNormGated

MIN_CHUNK, MAX_CHUNK = 16, 256  # the chunk sizes ssd_scan supports


class Mamba2(nn.Module):
    """Mamba-2 mixer: in_proj -> causal conv + SiLU on (x, B, C) -> SSD scan with per-head scalar A
    -> gated RMSNorm -> out_proj.

    Constructor arguments and state_dict layout are those of ``mamba_ssm.modules.mamba2.Mamba2``
    (and of Hugging Face transformers' ``Mamba2Mixer``), so their checkpoints load with
    ``strict=True``. With ``d_inner = expand * d_model``, ``d_ssm`` (default d_inner),
    ``nheads = d_ssm / headdim`` and ``conv_dim = d_ssm + 2 * ngroups * d_state``:

        in_proj   Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias)
                  split as [z0, x0 (d_inner - d_ssm each, the gated MLP part), z, xBC, dt]
        conv1d    Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, bias=conv_bias)
        dt_bias   [nheads]; A_log [nheads] (A = -exp(A_log), init uniform in A_init_range)
        D         [d_ssm] if D_has_hdim else [nheads]
        norm      RMSNormGated(d_ssm, eps=1e-5, group_size=d_ssm / ngroups) when rmsnorm
        out_proj  Linear(d_inner, d_model, bias=bias)

    Args:
        d_model, d_state (N), d_conv (2..8), conv_init (uniform +-conv_init init of conv1d),
        expand, headdim (P), d_ssm, ngroups (G, dividing nheads), A_init_range, D_has_hdim,
        rmsnorm (gated norm, else z gates the scan output directly), norm_before_gate,
        dt_min, dt_max, dt_init_floor, dt_limit (clamp of softplus(dt + dt_bias)), bias,
        conv_bias, chunk_size (a power of two in [16, 256]), use_mem_eff_path (accepted; the
        kernels are always used), layer_idx, process_group (must be None), sequence_parallel.
        context_parallel_group: as for nn.Mamba (``ssm_kernels.distributed``).

    Forward:
        u [B, L, d_model] (or [B * L, d_model] with ``seqlen=L``) -> out of the same shape.
        ``seq_idx`` [B, L] int32, non-decreasing: packed variable-length sequences (the conv and
        the scan never cross a change of index). ``cu_seqlens`` [num_seqs + 1] int32/int64
        (batch 1, not with seq_idx): packed sequences, each run as if alone; the states are then
        per sequence, ``conv_state`` [num_seqs, conv_dim, >= d_conv-1] and ``ssm_state``
        [num_seqs, nheads, headdim, d_state], in and out. ``conv_state`` [B, conv_dim,
        S >= d_conv-1] and ``ssm_state`` [B, nheads, headdim, d_state] continue a sequence;
        ``return_final_states=True`` returns ``(out, conv_state, ssm_state)`` after the last
        position (of each sequence). ``inference_params`` follows mamba_ssm's generation
        protocol (with cu_seqlens, the cache holds one row per sequence).

    Decoding: ``allocate_inference_cache`` gives zero ``conv_state`` [B, conv_dim, d_conv] and
    ``ssm_state`` [B, nheads, headdim, d_state] (float32; float64 for a float64 layer);
    ``step(u [B, 1, d_model], conv_state, ssm_state)`` updates them in place through the heads
    layout of ``selective_state_update`` and returns ``(out [B, 1, d_model], conv_state,
    ssm_state)``. Unlike mamba_ssm, ``step`` also applies ``dt_limit``, so decoding always equals
    the full forward.

    Raises:
        ValueError naming the argument: a non-positive size, headdim not dividing d_ssm, d_ssm
        larger than d_inner, ngroups not dividing nheads, chunk_size not a power of two in
        [16, 256], d_conv outside [2, 8], a bad A_init_range/dt range/dt_limit, a process_group.

    Example:
        >>> layer = Mamba2(d_model=64, d_state=32, headdim=16)
        >>> y = layer(torch.randn(2, 100, 64))
    """

    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64,
                 d_ssm=None, ngroups=1, A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True,
                 norm_before_gate=False, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
                 dt_limit=(0.0, float("inf")), bias=False, conv_bias=True, chunk_size=256,
                 use_mem_eff_path=True, layer_idx=None, process_group=None, sequence_parallel=True,
                 device=None, dtype=None, context_parallel_group=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if process_group is not None:
            raise ValueError("process_group: tensor parallelism is not supported, expected None")
        self.d_model = check_positive_int("d_model", d_model)
        self.d_state = check_positive_int("d_state", d_state)
        self.d_conv = check_conv_width(d_conv)
        self.conv_init = conv_init
        self.expand = check_positive_int("expand", expand)
        self.d_inner = self.expand * self.d_model
        self.headdim = check_positive_int("headdim", headdim)
        self.d_ssm = self.d_inner if d_ssm is None else check_positive_int("d_ssm", d_ssm)
        if self.d_ssm > self.d_inner:
            raise ValueError(f"d_ssm: expected at most d_inner={self.d_inner}, got {self.d_ssm}")
        if self.d_ssm % self.headdim != 0:
            raise ValueError(f"headdim: expected a divisor of d_ssm={self.d_ssm} (expand * d_model "
                             f"unless d_ssm is given), got {self.headdim}")
        self.nheads = self.d_ssm // self.headdim
        self.ngroups = check_positive_int("ngroups", ngroups)
        if self.nheads % self.ngroups != 0:
            raise ValueError(f"ngroups: expected a divisor of nheads={self.nheads}, got {self.ngroups}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < MIN_CHUNK \
                or chunk_size > MAX_CHUNK or chunk_size & (chunk_size - 1):
            raise ValueError(f"chunk_size: expected a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {chunk_size!r}")
        if len(A_init_range) != 2 or not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range: expected (lo, hi) with 0 < lo <= hi, got {A_init_range!r}")
        if len(dt_limit) != 2 or not 0.0 <= dt_limit[0] <= dt_limit[1]:
            raise ValueError(f"dt_limit: expected (lo, hi) with 0 <= lo <= hi, got {dt_limit!r}")
        check_dt_range(dt_min, dt_max, dt_init_floor)
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx
        self.activation = "silu"
        self.context_parallel_group = context_parallel_group

        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, **factory_kwargs)
        self.conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()

        dt_bias = inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device)
        self.dt_bias = nn.Parameter(dt_bias.to(dtype) if dtype is not None else dt_bias)  # [H]
        self.dt_bias._no_weight_decay = True
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))  # [H]
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // self.ngroups, **factory_kwargs)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    def _split(self, zxbcdt: torch.Tensor):
        d_mlp = self.d_inner - self.d_ssm
        return torch.split(zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)  # [conv_dim, W]

    def _head_D(self) -> torch.Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _finish(self, y, z, z0, x0):
        """Gated norm (or nothing, z already applied), the gated-MLP part, out_proj."""
        if self.rmsnorm:
            y = self.norm(y, z)
        if z0.shape[-1] > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def forward(self, u: torch.Tensor, seqlen: Optional[int] = None, seq_idx: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, inference_params=None, *,
                conv_state: Optional[torch.Tensor] = None, ssm_state: Optional[torch.Tensor] = None,
                return_final_states: bool = False):
        if self.context_parallel_group is not None:
            check_pieces(self.context_parallel_group, "Mamba2", u=u, seq_idx=seq_idx, cu_seqlens=cu_seqlens)
            if cu_seqlens is not None and inference_params is not None:
                raise ValueError("inference_params: not supported with cu_seqlens and context_parallel_group")
        flat = seqlen is not None
        if flat:
            if u.dim() != 2 or u.shape[0] % seqlen != 0:
                raise ValueError(f"u: expected shape (batch * seqlen={seqlen}, d_model), got {tuple(u.shape)}")
            u = u.view(u.shape[0] // seqlen, seqlen, u.shape[1])
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u: expected shape (batch, seqlen, d_model={self.d_model}), got {tuple(u.shape)}")
        batch, length, _ = u.shape
        if cu_seqlens is not None:
            if not isinstance(cu_seqlens, torch.Tensor):
                raise TypeError(f"cu_seqlens: expected a torch.Tensor, got {type(cu_seqlens).__name__}")
            if batch != 1:
                raise ValueError(f"cu_seqlens: expected batch 1 (packed sequences), got batch {batch}")
            if seq_idx is not None:
                raise ValueError("cu_seqlens: expected at most one of cu_seqlens and seq_idx, got both")
            if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
                raise ValueError(f"cu_seqlens: expected shape (num_seqs + 1,), got {tuple(cu_seqlens.shape)}")
        if seq_idx is not None and tuple(seq_idx.shape) != (batch, length):
            raise ValueError(f"seq_idx: expected shape ({batch}, {length}), got {tuple(seq_idx.shape)}")

        if inference_params is not None:
            rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
            cache_conv, cache_ssm = states_from_cache(self, inference_params, rows)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(u, cache_conv, cache_ssm)
            else:
                out, new_conv, new_ssm = self._forward(u, seq_idx, torch.zeros_like(cache_conv), None, True,
                                                       cu_seqlens)
                with torch.no_grad():
                    cache_conv.copy_(new_conv)
                    cache_ssm.copy_(new_ssm)
            return out.reshape(batch * length, -1) if flat else out

        out, new_conv, new_ssm = self._forward(u, seq_idx, conv_state, ssm_state, return_final_states, cu_seqlens)
        if flat:
            out = out.reshape(batch * length, -1)
        return (out, new_conv, new_ssm) if return_final_states else out

    def _check_states(self, batch: int, conv_state, ssm_state) -> None:
        if conv_state is not None and (conv_state.dim() != 3 or conv_state.shape[:2] != (batch, self.conv_dim)
                                       or conv_state.shape[2] < self.d_conv - 1):
            raise ValueError(f"conv_state: expected shape (batch={batch}, conv_dim={self.conv_dim}, "
                             f">= {self.d_conv - 1}), got {tuple(conv_state.shape)}")
        want = (batch, self.nheads, self.headdim, self.d_state)
        if ssm_state is not None and tuple(ssm_state.shape) != want:
            raise ValueError(f"ssm_state: expected shape {want}, got {tuple(ssm_state.shape)}")

    def _forward(self, u, seq_idx, conv_state, ssm_state, want_states, cu_seqlens=None):
        batch, length, _ = u.shape
        rows = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1  # states: per row or per sequence
        self._check_states(rows, conv_state, ssm_state)
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z0, x0, z, xBC, dt = self._split(self.in_proj(u))
        xBC = xBC.transpose(1, 2)  # [B, conv_dim, L] (channel-last view)
        cp_states = want_states and cu_seqlens is not None and self.context_parallel_group is not None
        weight, init_conv, conv_state = conv_inputs(self._conv_weight(), conv_state, xBC, rows, cp_states)
        conv1d, ssd_scan = ssm_kernels.causal_conv1d, ssm_kernels.ssd_scan
        packing = {} if cu_seqlens is None else {"cu_seqlens": cu_seqlens}
        if self.context_parallel_group is not None:
            conv1d, ssd_scan = context_parallel_ops(self.context_parallel_group, "causal_conv1d", "ssd_scan")
        xBC_c, final_conv = conv1d(
            xBC, weight, self.conv1d.bias, "silu", initial_states=init_conv,
            return_final_states=True, seq_idx=seq_idx, **packing)
        x, B, C = torch.split(xBC_c.transpose(1, 2), [self.d_ssm, G * N, G * N], dim=-1)  # [B, L, *]
        sd = state_dtype(x.dtype)
        A = -torch.exp(self.A_log.to(sd))  # [H]
        y, last_state = ssd_scan(
            x.unflatten(-1, (H, P)), dt, A, B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)),
            chunk_size=self.chunk_size, D=self._head_D().to(sd),
            z=None if self.rmsnorm else z.unflatten(-1, (H, P)), dt_bias=self.dt_bias.to(sd),
            dt_softplus=True, dt_limit=self.dt_limit,
            initial_states=None if ssm_state is None else ssm_state.to(sd), seq_idx=seq_idx,
            return_final_states=True, **packing)
        out = self._finish(y.flatten(-2), z, z0, x0)  # [B, L, d_model]
        if not want_states:
            return out, None, None
        return out, conv_state_out(conv_state, xBC, final_conv, self.d_conv, rows, cu_seqlens, seq_idx,
                                   cp_states), last_state

    def step(self, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One decode step: hidden_states [B, 1, d_model]; updates conv_state and ssm_state in place."""
        batch = step_batch(hidden_states, self.d_model)
        self._check_states(batch, conv_state, ssm_state)
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        z0, x0, z, xBC, dt = self._split(self.in_proj(hidden_states.squeeze(1)))  # [B, *]
        xBC = ssm_kernels.causal_conv1d_update(xBC, conv_state, self._conv_weight(), self.conv1d.bias, "silu")
        x, B, C = torch.split(xBC, [self.d_ssm, G * N, G * N], dim=-1)
        sd = ssm_state.dtype
        A = (-torch.exp(self.A_log.to(sd)))[:, None, None].expand(H, P, N)
        D = self._head_D().to(sd)
        D = D if D.dim() == 2 else D[:, None].expand(H, P)
        dt_bias = self.dt_bias.to(sd)
        if self.dt_limit == (0.0, math.inf):
            dt_bias, softplus = dt_bias[:, None].expand(H, P), True
        else:
            # The decode kernel has no clamp: discretise dt here as ssd_scan does.
            dt = F.softplus(dt.to(sd) + dt_bias).clamp(*self.dt_limit).to(x.dtype)
            dt_bias, softplus = None, False
        y = ssm_kernels.selective_state_update(
            ssm_state, x.unflatten(-1, (H, P)), dt[:, :, None].expand(batch, H, P), A,
            B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)), D=D,
            z=None if self.rmsnorm else z.unflatten(-1, (H, P)), dt_bias=dt_bias, dt_softplus=softplus)
        out = self._finish(y.flatten(-2), z, z0, x0)  # [B, d_model]
        return out.unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype=None, **kwargs):
        """Zero (conv_state [B, conv_dim, d_conv], ssm_state [B, nheads, headdim, d_state])."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=conv_dtype)
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=state_dtype(self.in_proj.weight.dtype))
        return conv_state, ssm_state
