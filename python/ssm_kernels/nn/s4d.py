"""The diagonal S4 layer (Gu, Gupta, Goel and Re, 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"): kernel from log_vandermonde, convolution by
fftconv with the D skip, GELU and an output projection."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import ssm_kernels

from .mamba import check_dt_range, check_positive_int

ACTIVATIONS = ("gelu", "silu", None)


def check_d_state(d_state) -> int:
    if isinstance(d_state, bool) or not isinstance(d_state, int) or d_state < 2 or d_state % 2:
        raise ValueError(f"d_state: expected an even int >= 2 (conjugate pairs), got {d_state!r}")
    return d_state


def complex_of(t: torch.Tensor) -> torch.Tensor:
    """The complex tensor stored as a real [..., 2] parameter."""
    return torch.view_as_complex(t)


def real_param(z: torch.Tensor, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.view_as_real(z).to(dtype).contiguous())


class _ConvSSM(nn.Module):
    """Shared by S4D and S4: y = act(K * u + D u) (by fftconv), out = output_linear(y), and the
    same map as a recurrence for step()."""

    def _init_common(self, d_model, d_state, dt_min, dt_max, activation, device, dtype):
        self.d_model = check_positive_int("d_model", d_model)
        self.d_state = check_d_state(d_state)
        check_dt_range(dt_min, dt_max, 0.0)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        pdtype = torch.float64 if dtype == torch.float64 else torch.float32
        log_dt = torch.rand(d_model, device=device, dtype=torch.float64) * (
            math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        self.log_dt = nn.Parameter(log_dt.to(pdtype))  # [H]
        self.D = nn.Parameter(torch.randn(d_model, device=device, dtype=pdtype))  # [H]
        self.output_linear = nn.Linear(d_model, d_model, device=device, dtype=dtype)
        return pdtype

    def _set_A(self, A: torch.Tensor, pdtype: torch.dtype) -> None:
        """A: [H, N/2] complex with negative real part -> log_A_real, A_imag parameters."""
        self.log_A_real = nn.Parameter(torch.log(-A.real).to(pdtype))  # [H, N/2]
        self.A_imag = nn.Parameter(A.imag.to(pdtype))  # [H, N/2]

    def _A(self) -> torch.Tensor:
        return torch.complex(-torch.exp(self.log_A_real), self.A_imag)  # [H, N/2]

    def _act(self, y: torch.Tensor) -> torch.Tensor:
        if self.activation == "gelu":
            return F.gelu(y)
        if self.activation == "silu":
            return F.silu(y)
        return y

    def _check_input(self, u: torch.Tensor) -> None:
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"u: expected shape (batch, seqlen, d_model={self.d_model}), got {tuple(u.shape)}")

    def _conv(self, u: torch.Tensor, k: torch.Tensor, k_rev: Optional[torch.Tensor]) -> torch.Tensor:
        y = ssm_kernels.fftconv(u.transpose(1, 2), k, D=self.D, k_rev=k_rev, activation=self.activation)
        return self.output_linear(y.transpose(1, 2))  # [B, L, H]

    def step(self, u: torch.Tensor, state: torch.Tensor):
        """One recurrent step: u [B, d_model], state [B, d_model, d_state/2] complex (from
        ``default_state``) -> (out [B, d_model], new state). Equals the convolutional mode."""
        if u.dim() != 2 or u.shape[1] != self.d_model:
            raise ValueError(f"u: expected shape (batch, d_model={self.d_model}), got {tuple(u.shape)}")
        want = (u.shape[0], self.d_model, self.d_state // 2)
        if tuple(state.shape) != want or not state.is_complex():
            raise ValueError(f"state: expected a complex tensor of shape {want}, got {state.dtype} {tuple(state.shape)}")
        y, state = self._step_ssm(u.to(self.D.dtype), state)
        y = self._act(y + self.D * u.to(self.D.dtype))
        return self.output_linear(y.to(self.output_linear.weight.dtype)), state

    def default_state(self, batch_size: int) -> torch.Tensor:
        """Zero recurrent state [batch_size, d_model, d_state/2] (complex64; complex128 for float64)."""
        cdtype = torch.complex128 if self.log_dt.dtype == torch.float64 else torch.complex64
        return torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=cdtype, device=self.log_dt.device)


class S4D(_ConvSSM):
    """Diagonal state-space layer (S4D) in convolution mode, with a recurrent ``step``.

    Per channel h, a diagonal complex SSM of N/2 conjugate pairs, ``x' = A x + u``, ``y = C x``
    (B folded into C), discretised with step ``dt = exp(log_dt)``:

        zoh:       dA = exp(dt A),                  dB = (exp(dt A) - 1) / A
        bilinear:  dA = (1 + dt A/2) / (1 - dt A/2), dB = dt / (1 - dt A/2)

    Kernel ``K_l = 2 Re(sum_n C_n dB_n dA_n^l)`` through ``log_vandermonde`` (nodes log dA), then
    ``y = act(K * u + D u)`` through ``fftconv`` and ``out = output_linear(y)``. With
    ``bidirectional`` a second C gives an anti-causal kernel (``k_rev`` of fftconv, lag 0
    included).

    Initialisation: ``init="inv"`` (S4D-Inv, A_n = -1/2 + i (N/pi)(N/(2n+1) - 1)) or "lin"
    (S4D-Lin, A_n = -1/2 + i pi n); C complex normal; D normal; log dt uniform in
    [log dt_min, log dt_max].

    Parameters: ``log_dt`` [H], ``log_A_real`` [H, N/2], ``A_imag`` [H, N/2], ``C``
    [channels, H, N/2, 2] (complex as real pairs), ``D`` [H], ``output_linear`` Linear(H, H).
    SSM parameters are float32 (float64 when dtype is float64).

    Shapes:
        forward: u [B, L, d_model] -> [B, L, d_model]
        step: u [B, d_model], state [B, d_model, d_state/2] complex -> (out, new state)

    Raises:
        ValueError naming the argument: d_state odd or < 2, unknown init, discretization or
        activation, a bad dt range; step on a bidirectional layer.

    Example:
        >>> layer = S4D(d_model=32, d_state=64)
        >>> y = layer(torch.randn(2, 1000, 32))
    """

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 0.001, dt_max: float = 0.1,
                 init: str = "inv", discretization: str = "zoh", bidirectional: bool = False,
                 activation: Optional[str] = "gelu", device=None, dtype=None):
        super().__init__()
        pdtype = self._init_common(d_model, d_state, dt_min, dt_max, activation, device, dtype)
        if init not in ("inv", "lin"):
            raise ValueError(f"init: expected 'inv' or 'lin', got {init!r}")
        if discretization not in ("zoh", "bilinear"):
            raise ValueError(f"discretization: expected 'zoh' or 'bilinear', got {discretization!r}")
        self.init = init
        self.discretization = discretization
        self.bidirectional = bidirectional
        half = d_state // 2
        n = torch.arange(half, dtype=torch.float64, device=device)
        if init == "lin":
            imag = math.pi * n
        else:
            imag = (d_state / math.pi) * (d_state / (2 * n + 1) - 1)
        A = torch.complex(torch.full_like(n, -0.5), imag).repeat(d_model, 1)  # [H, N/2]
        self._set_A(A, pdtype)
        channels = 2 if bidirectional else 1
        C = torch.randn(channels, d_model, half, dtype=torch.complex128, device=device)
        self.C = real_param(C, pdtype)  # [c, H, N/2, 2]

    def _discrete(self):
        """(dA, dB): [H, N/2] complex each."""
        dt = torch.exp(self.log_dt)[:, None]  # [H, 1]
        A = self._A()
        if self.discretization == "zoh":
            dA = torch.exp(dt * A)
            return dA, (dA - 1) / A
        denom = 1 - dt * A / 2
        return (1 + dt * A / 2) / denom, dt / denom

    def kernel(self, L: int) -> torch.Tensor:
        """The convolution kernel(s): [channels, H, L] float32 (float64 for a float64 layer)."""
        check_positive_int("L", L)
        dt = torch.exp(self.log_dt)[:, None]  # [H, 1]
        A = self._A()  # [H, N/2]
        C = complex_of(self.C)  # [c, H, N/2]
        if self.discretization == "zoh":
            nodes = dt * A  # log dA
            v = C * (torch.exp(nodes) - 1) / A
        else:
            denom = 1 - dt * A / 2
            nodes = torch.log((1 + dt * A / 2) / denom)
            v = C * (dt / denom)
        return ssm_kernels.log_vandermonde(v, nodes.expand_as(v), L, symmetric=True)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        self._check_input(u)
        k = self.kernel(u.shape[1])
        return self._conv(u, k[0], k[1] if self.bidirectional else None)

    def _step_ssm(self, u: torch.Tensor, state: torch.Tensor):
        if self.bidirectional:
            raise ValueError("bidirectional: step needs a causal layer (bidirectional=False)")
        dA, dB = self._discrete()  # [H, N/2]
        state = dA * state + dB * u[:, :, None]  # [B, H, N/2]
        y = 2 * (complex_of(self.C)[0] * state).sum(-1).real  # [B, H]
        return y, state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, init={self.init!r}, "
                f"discretization={self.discretization!r}, bidirectional={self.bidirectional}, "
                f"activation={self.activation!r}")
