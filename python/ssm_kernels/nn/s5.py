"""S5 layer (Smith, Warrington and Linderman, "Simplified State Space Layers for Sequence
Modeling", ICLR 2023) running on ``linear_scan``."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops.linear_scan import linear_scan


def hippo_n(n: int) -> torch.Tensor:
    """The normal part of the HiPPO-LegS matrix (S5 paper, section 4.1 and appendix B.1.1).

    HiPPO-LegS is A[n, k] = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); adding
    the rank-one P P^T with P[n] = sqrt(n + 1/2) leaves S = -I/2 + (a skew-symmetric matrix),
    which is normal and so unitarily diagonalisable. Returns S [N, N] float64.
    """
    q = torch.sqrt(1 + 2 * torch.arange(n, dtype=torch.float64))
    hippo = -(torch.tril(q[:, None] * q[None, :]) - torch.diag(torch.arange(n, dtype=torch.float64)))
    p = torch.sqrt(torch.arange(n, dtype=torch.float64) + 0.5)
    return hippo + p[:, None] * p[None, :]


def hippo_n_eig(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [N] and unitary eigenvectors [N, N] (complex128) of hippo_n(n), as S5 does it:
    every real part is the mean of the diagonal (-1/2) and the imaginary parts and eigenvectors
    come from the Hermitian matrix -i * (the skew-symmetric part). Eigenvalues are sorted by
    imaginary part, so the first n/2 are the conjugates of the last n/2 (for even n).
    """
    s = hippo_n(n)
    skew = (s - s.T) / 2
    lam_imag, v = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    lam_real = torch.full_like(lam_imag, s.diagonal().mean().item())
    return torch.complex(lam_real, lam_imag), v


class S5(nn.Module):
    """S5 layer: a multi-input multi-output diagonal state space model scanned in parallel.

    Per state n (complex, diagonal): x_t = Lambda_bar[n] x_{t-1} + (B_bar u_t)[n], and the output
    y_t = 2 Re(C x_t) + D * u_t, with only one state of each conjugate pair kept (the factor 2).
    Lambda is initialised from the eigenvalues of HiPPO-N (one copy per block of a block-diagonal
    state), B and C are drawn in the original basis and projected onto the eigenvectors
    (B_tilde = V^H B, C_tilde = C V), and the zero-order hold discretisation with a learned
    per-state timescale Delta = exp(log_step) gives Lambda_bar = exp(Lambda Delta),
    B_bar = (Lambda_bar - 1) / Lambda * B_tilde. With ``bidirectional`` a second scan runs from
    the end of the sequence with its own C, and the two read-outs are summed.

    Args:
        d_model: H, the number of input and output channels.
        state_dim: P, the state size before conjugate symmetry (P/2 complex states are kept); a
            multiple of 2 * blocks.
        blocks: J, the number of HiPPO-N blocks of the initial Lambda and eigenvectors.
        dt_min, dt_max: range of the initial timescales (log-uniform).
        bidirectional: add the reverse-time scan (no `step` then).
        clip_eigs: keep Re(Lambda) <= -1e-4 (stable for any step size).

    Shapes: forward u [B, L, H] -> y [B, L, H] (u's dtype, computed in float32/complex64);
    state [B, P/2] complex64.

    Example:
        >>> layer = S5(d_model=32, state_dim=64)
        >>> y = layer(torch.randn(4, 100, 32))  # [4, 100, 32]
        >>> state = layer.allocate_state(4)
        >>> y0, state = layer.step(torch.randn(4, 32), state)
    """

    def __init__(self, d_model: int, state_dim: int = 64, blocks: int = 1, dt_min: float = 0.001,
                 dt_max: float = 0.1, bidirectional: bool = False, clip_eigs: bool = False,
                 device=None):
        super().__init__()
        if d_model < 1:
            raise ValueError(f"d_model: expected >= 1, got {d_model}")
        if blocks < 1 or state_dim < 2 or state_dim % (2 * blocks) != 0:
            raise ValueError(f"state_dim: expected a positive multiple of 2 * blocks = {2 * blocks}, got {state_dim}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min, dt_max: expected 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.d_model = d_model
        self.state_dim = state_dim
        self.blocks = blocks
        self.bidirectional = bidirectional
        self.clip_eigs = clip_eigs
        block = state_dim // blocks
        lam, v = hippo_n_eig(block)
        half = block // 2
        lam, v = lam[:half], v[:, :half]  # [P/2J], [P/J, P/2J]: one of each conjugate pair
        lam = lam.repeat(blocks)  # [N], N = P/2
        v_full = torch.block_diag(*([v] * blocks))  # [P, N]
        n = state_dim // 2

        # B: lecun normal in the original basis, projected: B_tilde = V^H B.  [N, H]
        b = torch.randn(state_dim, d_model, dtype=torch.float64) / math.sqrt(d_model)
        b_tilde = v_full.conj().T @ b.to(torch.complex128)
        # C: standard normal (real and imaginary parts) in the original basis: C_tilde = C V.
        outputs = 2 if bidirectional else 1
        c = torch.complex(torch.randn(outputs, d_model, state_dim, dtype=torch.float64),
                          torch.randn(outputs, d_model, state_dim, dtype=torch.float64)) / math.sqrt(2)
        c_tilde = c @ v_full  # [O, H, N]

        f32 = dict(dtype=torch.float32, device=device)
        self.Lambda_re = nn.Parameter(lam.real.to(**f32))
        self.Lambda_im = nn.Parameter(lam.imag.to(**f32))
        self.B = nn.Parameter(torch.view_as_real(b_tilde).to(**f32))  # [N, H, 2]
        self.C = nn.Parameter(torch.view_as_real(c_tilde).to(**f32))  # [O, H, N, 2]
        self.D = nn.Parameter(torch.randn(d_model, **f32))
        log_step = torch.rand(n, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_step = nn.Parameter(log_step.to(**f32))

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-order hold: (Lambda_bar [N], B_bar [N, H]) in complex64."""
        lam_re = self.Lambda_re.clamp(max=-1e-4) if self.clip_eigs else self.Lambda_re
        lam = torch.complex(lam_re, self.Lambda_im)
        step = torch.exp(self.log_step)
        lam_bar = torch.exp(lam * step)
        b_bar = ((lam_bar - 1) / lam)[:, None] * torch.view_as_complex(self.B)
        return lam_bar, b_bar

    def allocate_state(self, batch: int, device=None) -> torch.Tensor:
        """Zero state [batch, N] complex64 for `step`."""
        return torch.zeros(batch, self.state_dim // 2, dtype=torch.complex64, device=device or self.D.device)

    def forward(self, u: torch.Tensor, initial_state: Optional[torch.Tensor] = None,
                return_last_state: bool = False, *, cu_seqlens: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None):
        """u [B, L, H] -> y [B, L, H]; with return_last_state also the state [B, N] after the
        last step (of the forward scan). initial_state [B, N] complex64 starts the forward scan.

        Packed sequences (API.md: packed sequences): ``cu_seqlens`` [S + 1] (batch 1) runs each
        sequence u[:, cu_seqlens[s]:cu_seqlens[s + 1]] on its own (both scans when
        bidirectional); initial_state and the returned state are then per sequence, [S, N].
        ``seq_idx`` [B, L] int32 restarts the scans where the index changes (states stay [B, N]).
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u: expected shape (batch, seqlen, d_model={self.d_model}), got {tuple(u.shape)}")
        lam_bar, b_bar = self.discretize()
        c = torch.view_as_complex(self.C)  # [O, H, N]
        u32 = u.to(torch.float32)
        bu = (u32.to(torch.complex64) @ b_bar.T).transpose(1, 2)  # [B, N, L], strided view
        a = lam_bar[None, :, None].expand(bu.shape)  # [B, N, L], stride 0 over batch and time
        packing = dict(cu_seqlens=cu_seqlens, seq_idx=seq_idx)
        h, last = linear_scan(a, bu, initial_state, return_last_state=True, **packing)  # [B, N, L], [B or S, N]
        y = h.transpose(1, 2) @ c[0].T  # [B, L, H]
        if self.bidirectional:
            h_rev = linear_scan(a, bu, reverse=True, **packing)
            y = y + h_rev.transpose(1, 2) @ c[1].T
        y = 2 * y.real + self.D * u32
        y = y.to(u.dtype)
        return (y, last) if return_last_state else y

    def step(self, u: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One recurrent step: u [B, H], state [B, N] complex64 -> (y [B, H], new state).

        Equal to the parallel mode one position at a time (not available when bidirectional).
        """
        if self.bidirectional:
            raise RuntimeError("step: a bidirectional S5 reads the future and has no recurrent mode")
        if u.dim() != 2 or u.shape[-1] != self.d_model:
            raise ValueError(f"u: expected shape (batch, d_model={self.d_model}), got {tuple(u.shape)}")
        lam_bar, b_bar = self.discretize()
        u32 = u.to(torch.float32)
        state = lam_bar * state + u32.to(torch.complex64) @ b_bar.T
        y = 2 * (state @ torch.view_as_complex(self.C)[0].T).real + self.D * u32
        return y.to(u.dtype), state
