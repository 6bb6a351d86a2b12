"""The Mamba-3 mixer (Lahoti et al. 2026, "Mamba-3: Improved Sequence Modeling using State Space
Principles", arXiv 2603.15569) on the mamba3_scan / mamba3_step kernels."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssm_kernels

from .norm import RMSNormGated


def heavy_tail_activation(x: torch.Tensor) -> torch.Tensor:
    """1 + x for x >= 0, 1 / (1 - x) for x < 0: positive, continuous, with slowly decaying tail
    (the activation of mamba_ssm's data-dependent A)."""
    return x.clamp_min(0) + torch.reciprocal(1 - x.clamp_max(0))


class Mamba3(nn.Module):
    """Mamba-3 mixer: in_proj -> (z, x, B, C, dt, A, trap, angles) -> RMSNorm on B and C ->
    mamba3_scan (SISO, or MIMO of rank ``mimo_rank``) -> optional gated RMSNorm -> out_proj.
    No short convolution.

    Parameter names and state_dict layout of ``mamba_ssm.modules.mamba3.Mamba3``, so its
    checkpoints load with ``strict=True``. With ``d_inner = expand * d_model``,
    ``nheads = d_inner / headdim``, R = mimo_rank (1 without MIMO) and
    ``A_pairs = (d_state * rope_fraction) // 2`` rotary pairs:

        in_proj   Linear(d_model, 2 d_inner + 2 d_state ngroups R + 3 nheads + A_pairs, bias=False),
                  split as [z, x, B, C, dd_dt, dd_A, trap, angle]
        dt_bias   [nheads] (softplus^-1 of dt drawn log-uniformly in [dt_min, dt_max])
        B_bias, C_bias  [nheads, R, d_state] (init 1)
        B_norm, C_norm  RMSNormGated(d_state) (weight [d_state])
        mimo_x, mimo_z, mimo_o  [nheads, R, headdim] (MIMO only)
        D         [nheads]
        norm      RMSNormGated(d_inner, group_size=headdim, norm_before_gate=True) when
                  is_outproj_norm (SISO only here)
        out_proj  Linear(d_inner, d_model, bias=False)

    Per token: dt = softplus(dd_dt + dt_bias), A = -max(heavy_tail(dd_A), A_floor), adt = A dt;
    q = C_norm(C) (+ C_bias in the kernel), k = B_norm(B) (+ B_bias), v = x; the angle rates are
    shared by the heads.

    Forward:
        u [B, L, d_model] -> out [B, L, d_model]; with ``return_final_states=True`` also the
        states (angle, ssm, k, v) (see ``ssm_kernels.mamba3_scan``), from which ``step``
        continues; ``initial_states`` continues from such states. ``cu_seqlens``
        [num_seqs + 1] int32/int64 (u [1, T, d_model]): packed sequences, each run as if alone
        (the layer has no convolution, so only the scan sees them); ``initial_states`` and the
        returned states are then per sequence ([num_seqs, nheads, ...]), ready for ``step`` on a
        batch of num_seqs.

    Raises:
        ValueError for sizes that do not fit (d_inner not a multiple of headdim, no rotary pair),
        NotImplementedError for is_outproj_norm with MIMO.

    Example:
        >>> layer = Mamba3(64, d_state=16, headdim=16)
        >>> out = layer(torch.randn(2, 100, 64))
    """

    def __init__(self, d_model, d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5, dt_min=0.001,
                 dt_max=0.1, dt_init_floor=1e-4, A_floor=1e-4, is_outproj_norm=False, is_mimo=False, mimo_rank=4,
                 chunk_size=64, layer_idx=None, device=None, dtype=None, **kwargs):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.expand, self.headdim = d_model, d_state, expand, headdim
        self.chunk_size, self.layer_idx, self.A_floor = chunk_size, layer_idx, A_floor
        self.is_outproj_norm, self.is_mimo = is_outproj_norm, is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1
        if is_mimo and is_outproj_norm:
            raise NotImplementedError("is_outproj_norm: the per-rank output norm of MIMO is not supported")
        self.d_inner = int(expand * d_model)
        if self.d_inner % headdim != 0:
            raise ValueError(f"headdim: expected a divisor of d_inner={self.d_inner}, got {headdim}")
        self.nheads = self.d_inner // headdim
        self.num_bc_heads = ngroups
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"rope_fraction: expected 0.5 or 1.0, got {rope_fraction}")
        self.num_rope_angles = (int(d_state * rope_fraction) // 2 * 2) // 2
        if self.num_rope_angles < 1:
            raise ValueError(f"d_state: expected at least one rotary pair, got d_state={d_state}")
        R, N, H = self.mimo_rank, d_state, self.nheads
        d_in_proj = 2 * self.d_inner + 2 * N * ngroups * R + 3 * H + self.num_rope_angles
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=False, **factory)
        dt = torch.exp(torch.rand(H, device=device) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        self.B_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.C_bias = nn.Parameter(torch.ones(H, R, N, device=device))
        self.B_norm = RMSNormGated(N, eps=1e-5, **factory)
        self.C_norm = RMSNormGated(N, eps=1e-5, **factory)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.ones(H, R, headdim, device=device) / R)
            self.mimo_z = nn.Parameter(torch.ones(H, R, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.ones(H, R, headdim, device=device) / R)
        self.D = nn.Parameter(torch.ones(H, device=device))
        self.D._no_weight_decay = True
        if is_outproj_norm:
            self.norm = RMSNormGated(self.d_inner, eps=1e-5, norm_before_gate=True, group_size=headdim, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **factory)

    def _project(self, u: torch.Tensor):
        """The kernel inputs of u [..., d_model] ([B, L, .] or [B, .] for one step)."""
        R, N, H, G, P = self.mimo_rank, self.d_state, self.nheads, self.num_bc_heads, self.headdim
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
            self.in_proj(u), [self.d_inner, self.d_inner, N * G * R, N * G * R, H, H, H, self.num_rope_angles],
            dim=-1)
        lead = u.shape[:-1]
        z = z.unflatten(-1, (H, P))
        x = x.unflatten(-1, (H, P))
        B = self.B_norm(B.unflatten(-1, (R, G, N)))
        C = self.C_norm(C.unflatten(-1, (R, G, N)))
        if not self.is_mimo:
            B, C = B.squeeze(-3), C.squeeze(-3)
        A = -heavy_tail_activation(dd_A.float()).clamp_min(self.A_floor)
        dt = F.softplus(dd_dt + self.dt_bias)
        adt = A * dt
        angles = angles.float().unsqueeze(-2).expand(*lead, H, self.num_rope_angles)
        return z, x, B, C, adt, dt, trap, angles

    def _weights(self):
        if self.is_mimo:
            return {"q_bias": self.C_bias, "k_bias": self.B_bias, "mimo_v": self.mimo_x, "mimo_z": self.mimo_z,
                    "mimo_o": self.mimo_o}
        return {"q_bias": self.C_bias.squeeze(1), "k_bias": self.B_bias.squeeze(1)}

    def forward(self, u: torch.Tensor, initial_states: Optional[Sequence[torch.Tensor]] = None,
                return_final_states: bool = False, cu_seqlens: Optional[torch.Tensor] = None):
        z, x, B, C, adt, dt, trap, angles = self._project(u)
        gate = None if self.is_outproj_norm else z
        weights = self._weights()
        if gate is None:
            weights.pop("mimo_z", None)
        y, states = ssm_kernels.mamba3_scan(
            C, B, x, adt.transpose(1, 2), dt.transpose(1, 2), trap.transpose(1, 2), angles=angles, D=self.D,
            z=gate, initial_states=initial_states, chunk_size=self.chunk_size, return_final_states=True,
            cu_seqlens=cu_seqlens, **weights)
        y = y.flatten(-2)
        if self.is_outproj_norm:
            y = self.norm(y, z.flatten(-2))
        out = self.out_proj(y.to(x.dtype))
        return (out, states) if return_final_states else out

    def allocate_inference_cache(self, batch_size: int, device=None, dtype=torch.float32):
        """Zero states (angle, ssm, k, v) for ``step``."""
        H, P, N, R = self.nheads, self.headdim, self.d_state, self.mimo_rank
        device = device or self.in_proj.weight.device
        kshape = (batch_size, H, R, N) if self.is_mimo else (batch_size, H, N)
        vshape = (batch_size, H, R, P) if self.is_mimo else (batch_size, H, P)
        shapes = ((batch_size, H, self.num_rope_angles), (batch_size, H, P, N), kshape, vshape)
        return tuple(torch.zeros(s, device=device, dtype=dtype) for s in shapes)

    def step(self, u: torch.Tensor, states: Sequence[torch.Tensor]) -> torch.Tensor:
        """One decoding step: u [B, d_model] -> out [B, d_model]; updates the four float32 states
        (angle, ssm, k, v) in place."""
        z, x, B, C, adt, dt, trap, angles = self._project(u)
        gate = None if self.is_outproj_norm else z
        weights = self._weights()
        if gate is None:
            weights.pop("mimo_z", None)
        y = ssm_kernels.mamba3_step(*states, C, B, x, adt, dt, trap, angles=angles, D=self.D, z=gate, **weights)
        y = y.flatten(-2)
        if self.is_outproj_norm:
            y = self.norm(y, z.flatten(-2))
        return self.out_proj(y.to(x.dtype))
