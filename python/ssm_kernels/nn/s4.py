"""The S4 layer with a diagonal-plus-low-rank state matrix (Gu, Goel and Re, 2022, "Efficiently
Modeling Long Sequences with Structured State Spaces", Algorithm 1): kernel from the Cauchy
kernel at the roots of unity with the Woodbury correction and the bilinear transform."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

import ssm_kernels

from .mamba import check_positive_int
from .s4d import _ConvSSM, complex_of, real_param


def hippo_legs_nplr(N: int):
    """HiPPO-LegS as normal plus low rank, diagonalised: (Lambda, P, B), each [N/2] complex128.

    A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k); B_n = sqrt(2n+1);
    P_n = sqrt(n + 1/2). A + P P^T = -I/2 + S with S skew-symmetric, so A = V (Lambda - P~ P~^*)
    V^* with Lambda = -1/2 + i eig(-i S), P~ = V^* P, B~ = V^* B. The eigenvalues come in
    conjugate pairs; the half with positive imaginary part is kept (the other is implicit).
    """
    n = torch.arange(N, dtype=torch.float64)
    q = torch.sqrt(2 * n + 1)
    A = -torch.tril(q[:, None] * q[None, :], -1) - torch.diag(n + 1)
    P = torch.sqrt(n + 0.5)
    S = A + P[:, None] * P[None, :]  # -I/2 + skew-symmetric
    skew = S + 0.5 * torch.eye(N, dtype=torch.float64)
    omega, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))  # skew = V diag(i omega) V^*
    keep = torch.argsort(omega, descending=True)[: N // 2]  # omega > 0
    V = V[:, keep]  # [N, N/2]
    Lambda = torch.complex(torch.full((N // 2,), -0.5, dtype=torch.float64), omega[keep])
    Vh = V.conj().T
    return Lambda, Vh @ P.to(torch.complex128), Vh @ q.to(torch.complex128)


def _full(t: torch.Tensor) -> torch.Tensor:
    """[..., N/2] stored half -> [..., N] full state vector (the conjugate half appended)."""
    return torch.cat([t, t.conj()], dim=-1)


class S4(_ConvSSM):
    """S4 layer (DPLR state matrix, HiPPO-LegS initialisation) in convolution mode, with a
    recurrent ``step``.

    Per channel h, an SSM with N = d_state complex states in conjugate pairs (N/2 stored):
    ``A = Lambda - P P^*`` (diagonal plus rank one), input vector B, output vector C, discretised
    by the bilinear transform with step ``dt = exp(log_dt)``:
    ``dA = (I - dt/2 A)^{-1} (I + dt/2 A)``, ``dB = (I - dt/2 A)^{-1} dt B``. The kernel
    ``K_l = C dA^l dB`` (l < L) is computed as in Algorithm 1 of the S4 paper:

        C~ = C (I - dA^L)                                   (length-L truncation)
        k_ab(w) = sum_n a_n b_n / (g(w) - Lambda_n),  g(w) = (2/dt) (1 - w)/(1 + w)
                  for (a, b) in (C~, B), (C~, P), (P^*, B), (P^*, P)   (cauchy, conjugates implicit)
        K^(w) = 2/(1 + w) [k_00 - k_01 k_10 / (1 + k_11)]    (Woodbury identity)
        K = irfft(K^(w_k)),  w_k = exp(-2 pi i k / L)

    At w = -1 (even L) the formula is singular and ``K^(-1) = (dt/2) C~ B`` is used exactly.
    C~ needs dA^L, taken by repeated squaring of the dense N x N matrix (cheap for N <= 256).
    Then ``y = act(K * u + D u)`` by ``fftconv``, ``out = output_linear(y)``. ``step`` runs the
    same discretised recurrence in O(N) per channel (Sherman-Morrison for the rank-one part).

    Parameters: ``log_dt`` [H], ``log_A_real`` and ``A_imag`` [H, N/2] (Lambda), ``P``, ``B``,
    ``C`` [H, N/2, 2] (complex as real pairs), ``D`` [H], ``output_linear`` Linear(H, H).

    Shapes:
        forward: u [B, L, d_model] -> [B, L, d_model]
        step: u [B, d_model], state [B, d_model, d_state/2] complex -> (out, new state)

    Raises:
        ValueError naming the argument: d_state odd or < 2, unknown activation, bad dt range.

    Example:
        >>> layer = S4(d_model=32, d_state=64)
        >>> y = layer(torch.randn(2, 1000, 32))
    """

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1,
                 activation: Optional[str] = "gelu", device=None, dtype=None):
        super().__init__()
        pdtype = self._init_common(d_model, d_state, dt_min, dt_max, activation, device, dtype)
        Lambda, P, B = hippo_legs_nplr(d_state)
        self._set_A(Lambda.repeat(d_model, 1).to(device), pdtype)
        self.P = real_param(P.repeat(d_model, 1).to(device), pdtype)  # [H, N/2, 2]
        self.B = real_param(B.repeat(d_model, 1).to(device), pdtype)  # [H, N/2, 2]
        C = torch.randn(d_model, d_state // 2, dtype=torch.complex128, device=device)
        self.C = real_param(C, pdtype)  # [H, N/2, 2]

    def _dense(self, dtype=None):
        """Full-state (N = d_state) dense dA [H, N, N], dt [H], and the full C [H, N] (in the
        complex dtype `dtype` when given)."""
        wide = (lambda t: t if dtype is None else t.to(dtype))  # noqa: E731
        dt = torch.exp(self.log_dt.to(torch.float64) if dtype is not None else self.log_dt)  # [H]
        Lam = wide(self._A())
        P = wide(complex_of(self.P))
        A = torch.diag_embed(_full(Lam)) - _full(P)[:, :, None] * _full(P).conj()[:, None, :]  # [H, N, N]
        eye = torch.eye(self.d_state, dtype=A.dtype, device=A.device)
        half_dtA = (dt / 2)[:, None, None] * A
        dA = torch.linalg.solve(eye - half_dtA, eye + half_dtA)
        return dA, dt, _full(wide(complex_of(self.C)))

    def kernel(self, L: int) -> torch.Tensor:
        """The convolution kernel: [1, H, L] in the layer's dtype.

        Generated in complex128 whatever the layer's dtype: the DPLR generating function is
        ill-conditioned in single precision for small dt (the Woodbury correction and
        C (I - dA^L) cancel), which showed as 4e-4 relative error in the gradient of log_dt in
        complex64. The cost, O(H N L) for the Cauchy product plus O(H N^3 log L) for dA^L, is
        small next to the convolution it feeds.
        """
        check_positive_int("L", L)
        half = self.d_state // 2
        wide = torch.complex128
        dA, dt, C_full = self._dense(wide)  # [H, N, N], [H] float64, [H, N]
        C_t = (C_full - (C_full[:, None, :] @ torch.linalg.matrix_power(dA, L)).squeeze(1))[:, :half]  # C~
        Lam = self._A().to(wide)  # [H, N/2]
        P, B = complex_of(self.P).to(wide), complex_of(self.B).to(wide)
        v = torch.stack([C_t * B, C_t * P, P.conj() * B, P.conj() * P])  # [4, H, N/2]
        w = (dt / 2)[:, None] * Lam  # g - Lambda = (2/dt) (s - dt Lambda / 2)
        n_freq = L // 2 + 1
        n_regular = n_freq - 1 if L % 2 == 0 else n_freq  # w_k = -1 handled apart
        k = torch.arange(n_regular, dtype=torch.float64, device=w.device)
        s = torch.complex(torch.zeros_like(k), torch.tan(math.pi * k / L)).to(wide)  # (1-w)/(1+w)
        r = ssm_kernels.cauchy(v, s, w) * (dt / 2)[:, None]  # [4, H, K]
        k00, k01, k10, k11 = r.unbind(0)
        omega = torch.polar(torch.ones_like(k), -2 * math.pi * k / L).to(wide)
        K_hat = 2 / (1 + omega) * (k00 - k01 * k10 / (1 + k11))  # [H, K]
        if L % 2 == 0:
            at_minus_one = (dt * (C_t * B).sum(-1).real).to(wide)  # (dt/2) C~ B over both halves
            K_hat = torch.cat([K_hat, at_minus_one[:, None]], dim=-1)
        return torch.fft.irfft(K_hat, n=L)[None].to(self.log_dt.dtype)  # [1, H, L]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        self._check_input(u)
        return self._conv(u, self.kernel(u.shape[1])[0], None)

    def _step_ssm(self, u: torch.Tensor, state: torch.Tensor):
        dt = torch.exp(self.log_dt)[:, None]  # [H, 1]
        Lam = self._A()
        P, B, C = complex_of(self.P), complex_of(self.B), complex_of(self.C)  # [H, N/2]
        E = 1 / (1 - dt / 2 * Lam)  # (I - dt/2 Lambda)^{-1}
        # (I + dt/2 A) h + dt B u, with P^* h over both conjugate halves = 2 Re(sum conj(P) h).
        ph = 2 * (P.conj() * state).sum(-1, keepdim=True).real  # [B, H, 1]
        f = state + dt / 2 * (Lam * state - P * ph) + dt * B * u[:, :, None]
        # (I - dt/2 A)^{-1} = (M + (dt/2) P P^*)^{-1}, M = I - dt/2 Lambda: Sherman-Morrison.
        Ef = E * f
        pEf = 2 * (P.conj() * Ef).sum(-1, keepdim=True).real  # [B, H, 1]
        pEp = dt * (P.abs().square() * E).sum(-1, keepdim=True).real  # (dt/2) * 2 Re(...) [H, 1]
        state = Ef - dt / 2 * E * P * pEf / (1 + pEp)
        y = 2 * (C * state).sum(-1).real  # [B, H]
        return y, state

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, activation={self.activation!r}"
