"""nn.S4D and nn.S4: forward and gradients against float64 compositions of reference ops, kernels
against a dense float64 recurrence of the discretised system, convolutional == recurrent mode."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ssm_kernels import reference as R
from ssm_kernels import testing
from ssm_kernels.nn import S4, S4D

F32, F64 = torch.float32, torch.float64


def A64(p):
    return torch.complex(-torch.exp(p["log_A_real"]), p["A_imag"])  # [H, N/2]


def s4d_kernel64(p, m, L):
    dt = torch.exp(p["log_dt"])[:, None]
    A = A64(p)
    C = torch.view_as_complex(p["C"])  # [c, H, N/2]
    if m.discretization == "zoh":
        v, x = C * (torch.exp(dt * A) - 1) / A, dt * A
    else:
        v, x = C * dt / (1 - dt * A / 2), torch.log((1 + dt * A / 2) / (1 - dt * A / 2))
    return R.log_vandermonde(v, x.expand_as(v), L)  # [c, H, L]


def s4_kernel64(p, m, L):
    """Algorithm 1 of the S4 paper in float64 with reference.cauchy (independent of the module)."""
    dt = torch.exp(p["log_dt"])  # [H]
    Lam, P, B, C = A64(p), *(torch.view_as_complex(p[k]) for k in ("P", "B", "C"))
    N = 2 * Lam.shape[-1]
    both = lambda t: torch.cat([t, t.conj()], -1)  # noqa: E731
    A = torch.diag_embed(both(Lam)) - both(P)[:, :, None] * both(P).conj()[:, None, :]
    I = torch.eye(N, dtype=A.dtype)
    dA = torch.linalg.inv(I - dt[:, None, None] / 2 * A) @ (I + dt[:, None, None] / 2 * A)
    Ct = (both(C)[:, None, :] @ (I - torch.linalg.matrix_power(dA, L)))[:, 0, : N // 2]  # [H, N/2]
    ks = torch.arange(L // 2 + 1, dtype=F64)
    omega = torch.exp(-2j * math.pi * ks / L)
    regular = (1 + omega).abs() > 1e-9
    g = (2 / dt[:, None]) * (1 - omega[regular]) / (1 + omega[regular])  # [H, K]
    cauchy = lambda a: torch.stack([R.cauchy(a[h], g[h], Lam[h]) for h in range(a.shape[0])])  # noqa: E731
    k00, k01, k10, k11 = (cauchy(a) for a in (Ct * B, Ct * P, P.conj() * B, P.conj() * P))
    K_hat = 2 / (1 + omega[regular]) * (k00 - k01 * k10 / (1 + k11))
    if not regular.all():
        K_hat = torch.cat([K_hat, (dt * (Ct * B).sum(-1).real)[:, None].to(K_hat.dtype)], dim=-1)
    return torch.fft.irfft(K_hat, n=L)[None]


def layer64(p, m, u, k, k_rev=None):
    y = R.fftconv(u.to(F64).transpose(1, 2), k, D=p["D"], k_rev=k_rev, activation=m.activation)
    return F.linear(y.transpose(1, 2), p["output_linear.weight"], p["output_linear.bias"])


def dense_kernel64(m, L):
    """K_l = C dA^l dB by running the discretised full-state system on an impulse (float64)."""
    p = {n: t.detach().to(F64) for n, t in m.named_parameters()}
    dt = torch.exp(p["log_dt"])  # [H]
    Lam = A64(p)
    both = lambda t: torch.cat([t, t.conj()], -1)  # noqa: E731
    if isinstance(m, S4D):
        C = both(torch.view_as_complex(p["C"])[0])
        A = torch.diag_embed(both(Lam))
        Bv = torch.ones_like(C)
    else:
        P, Bv, C = (both(torch.view_as_complex(p[k])) for k in ("P", "B", "C"))
        A = torch.diag_embed(both(Lam)) - P[:, :, None] * P.conj()[:, None, :]
    N = A.shape[-1]
    I = torch.eye(N, dtype=A.dtype)
    dtc = dt[:, None, None].to(A.dtype)
    if isinstance(m, S4D) and m.discretization == "zoh":
        dA = torch.linalg.matrix_exp(dtc * A)
        dB = torch.linalg.solve(A, (dA - I) @ Bv[..., None])[..., 0]
    else:
        dA = torch.linalg.solve(I - dtc / 2 * A, I + dtc / 2 * A)
        dB = torch.linalg.solve(I - dtc / 2 * A, (dtc[..., 0] * Bv)[..., None])[..., 0]
    x, ks = dB, []
    for _ in range(L):
        ks.append((C * x).sum(-1).real)
        x = (dA @ x[..., None])[..., 0]
    return torch.stack(ks, dim=-1)  # [H, L]


S4D_CASES = {
    "L1-inv-zoh": (1, dict(init="inv", discretization="zoh")),
    "L2-lin-bilinear": (2, dict(init="lin", discretization="bilinear")),
    "L33-inv-bilinear-bidir": (33, dict(init="inv", discretization="bilinear", bidirectional=True)),
    "L256-lin-zoh-silu": (256, dict(init="lin", discretization="zoh", activation="silu")),
    "L100-inv-zoh-bidir-noact": (100, dict(init="inv", discretization="zoh", bidirectional=True, activation=None)),
}


def check_layer(m, L, device, reference_kernel, bidirectional=False):
    x = testing.make_tensor((2, L, m.d_model), F32, device, requires_grad=True)

    def reference(p64, x64):
        k = reference_kernel(p64, m, L)
        return layer64(p64, m, x64, k[0], k[1] if bidirectional else None)

    testing.check_module_matches_reference(m, x, reference)


@pytest.mark.parametrize("L,kwargs", list(S4D_CASES.values()), ids=list(S4D_CASES))
def test_s4d_forward_grads_match_reference(L, kwargs, device):
    m = S4D(6, d_state=8, dt_min=0.01, dt_max=0.5, **kwargs, device=device)
    check_layer(m, L, device, lambda p, mod, n: s4d_kernel64(p, mod, n).to(device), m.bidirectional)


@pytest.mark.parametrize("L", [1, 2, 7, 64, 255])
def test_s4_forward_grads_match_reference(L, device):
    m = S4(4, d_state=8, dt_min=0.01, dt_max=0.5, device=device)
    check_layer(m, L, device, lambda p, mod, n: s4_kernel64({k: v.cpu() for k, v in p.items()}, mod, n).to(device))


@pytest.mark.parametrize("layer", ["S4D-zoh", "S4D-bilinear", "S4"])
@pytest.mark.parametrize("L", [1, 16, 17])
def test_kernel_matches_dense_recurrence_f64(layer, L):
    m = S4(3, d_state=8, dt_min=0.01, dt_max=0.5) if layer == "S4" else \
        S4D(3, d_state=8, dt_min=0.01, dt_max=0.5, discretization=layer.split("-")[1])
    m = m.double()
    with torch.no_grad():
        testing.assert_close(m.kernel(L)[0], dense_kernel64(m, L), F64, name="kernel (float64 layer)")


@pytest.mark.parametrize("layer", ["S4D", "S4"])
def test_kernel_matches_dense_recurrence_long_f32(layer):
    L = 1000
    m = S4(4, d_state=32) if layer == "S4" else S4D(4, d_state=32)
    with torch.no_grad():
        testing.assert_close(m.kernel(L)[0], dense_kernel64(m, L), F32, name="kernel (float32 layer)")


@pytest.mark.parametrize("layer", ["S4D-inv-zoh", "S4D-lin-bilinear", "S4"])
def test_recurrent_step_matches_convolution(layer, device):
    if layer == "S4":
        m = S4(5, d_state=16, dt_min=0.01, dt_max=0.3, device=device)
    else:
        _, init, disc = layer.split("-")
        m = S4D(5, d_state=16, dt_min=0.01, dt_max=0.3, init=init, discretization=disc, device=device)
    L = 23
    x = testing.make_tensor((2, L, 5), F32, device)
    with torch.no_grad():
        conv = m(x)
        state = m.default_state(2)
        assert state.shape == (2, 5, 8) and state.dtype == torch.complex64
        outs = []
        for t in range(L):
            out, state = m.step(x[:, t], state)
            outs.append(out)
    testing.assert_close(torch.stack(outs, dim=1), conv, F32, name="recurrent outputs")


def test_s4_hippo_legs_initialisation():
    """Lambda - P P^*, B, P are HiPPO-LegS (A, B, P) in a unitary basis: unitary invariants agree
    (eigenvalues of the non-normal LegS matrix are too ill-conditioned to compare directly)."""
    N = 16
    m = S4(2, d_state=N, dtype=F64)
    n = torch.arange(N, dtype=F64)
    q = torch.sqrt(2 * n + 1)
    hippo = (-torch.tril(q[:, None] * q[None, :], -1) - torch.diag(n + 1)).to(torch.complex128)
    Pv, Bv = torch.sqrt(n + 0.5).to(hippo.dtype), q.to(hippo.dtype)
    p = {k: v.detach() for k, v in m.named_parameters()}
    Lam = A64(p)[0]
    P, B = (torch.view_as_complex(p[k])[0] for k in ("P", "B"))
    both = lambda t: torch.cat([t, t.conj()])  # noqa: E731
    P, B = both(P), both(B)
    A = torch.diag(both(Lam)) - P[:, None] * P.conj()[None, :]
    assert torch.allclose(Lam.real, torch.full_like(Lam.real, -0.5))
    for j in range(4):
        Aj, Hj = torch.linalg.matrix_power(A, j), torch.linalg.matrix_power(hippo, j)
        for name, got, want in [("tr A^j", torch.trace(Aj), torch.trace(Hj)),
                                ("B^* A^j B", B.conj() @ Aj @ B, Bv @ Hj @ Bv),
                                ("P^* A^j B", P.conj() @ Aj @ B, Pv @ Hj @ Bv)]:
            testing.assert_close(got.reshape(1), want.reshape(1), F64, name=f"{name}, j={j}")
    testing.assert_close(torch.trace(A @ A.mH).reshape(1), torch.trace(hippo @ hippo.mH).reshape(1), F64)


def test_s4d_initialisation():
    N = 8
    lin = S4D(3, d_state=N, init="lin")
    inv = S4D(3, d_state=N, init="inv")
    n = torch.arange(N // 2, dtype=F32)
    assert torch.allclose(lin.A_imag, (math.pi * n).repeat(3, 1))
    assert torch.allclose(inv.A_imag, ((N / math.pi) * (N / (2 * n + 1) - 1)).repeat(3, 1))
    assert torch.allclose(torch.exp(lin.log_A_real), torch.full((3, N // 2), 0.5))
    dt = torch.exp(S4D(64, dt_min=0.01, dt_max=0.02).log_dt)
    assert dt.min() >= 0.01 * (1 - 1e-6) and dt.max() <= 0.02 * (1 + 1e-6)


def test_layers_keep_parameters_in_float32_for_bf16_projection():
    m = S4D(4, d_state=4, dtype=torch.bfloat16)
    assert m.output_linear.weight.dtype == torch.bfloat16 and m.log_dt.dtype == F32 and m.C.dtype == F32


@pytest.mark.parametrize("cls,kwargs,name", [
    (S4D, dict(d_model=4, d_state=7), "d_state"),
    (S4D, dict(d_model=4, d_state=0), "d_state"),
    (S4D, dict(d_model=0), "d_model"),
    (S4D, dict(d_model=4, init="legs"), "init"),
    (S4D, dict(d_model=4, discretization="euler"), "discretization"),
    (S4D, dict(d_model=4, activation="relu"), "activation"),
    (S4D, dict(d_model=4, dt_min=0.1, dt_max=0.01), "dt_max"),
    (S4, dict(d_model=4, d_state=5), "d_state"),
    (S4, dict(d_model=4, activation="tanh"), "activation"),
], ids=lambda v: v if isinstance(v, str) else (v.__name__ if isinstance(v, type) else None))
def test_bad_constructor_arguments(cls, kwargs, name):
    testing.assert_raises_naming(ValueError, name, cls, **kwargs)


def test_bad_call_arguments():
    m = S4D(4, d_state=4, bidirectional=True)
    testing.assert_raises_naming(ValueError, "bidirectional", m.step, torch.randn(2, 4), m.default_state(2))
    testing.assert_raises_naming(ValueError, "u", m, torch.randn(2, 5, 3))
    s = S4(4, d_state=4)
    testing.assert_raises_naming(ValueError, "state", s.step, torch.randn(2, 4), torch.zeros(2, 4, 2))
    testing.assert_raises_naming(ValueError, "L", s.kernel, 0)
