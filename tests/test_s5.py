import time

import pytest
import torch

from ssm_kernels import reference
from ssm_kernels.nn import S5
from ssm_kernels.nn.s5 import hippo_n, hippo_n_eig
from ssm_kernels.testing import assert_close, assert_raises_naming

f32, f64, c64, c128 = torch.float32, torch.float64, torch.complex64, torch.complex128


def test_hippo_n_eigendecomposition():
    n = 8
    s = hippo_n(n)
    # HiPPO-LegS written out entry by entry, plus the rank-one term.
    legs = torch.zeros(n, n, dtype=f64)
    for i in range(n):
        for k in range(n):
            if i > k:
                legs[i, k] = -((2 * i + 1) * (2 * k + 1)) ** 0.5
            elif i == k:
                legs[i, k] = -(i + 1)
    p = torch.sqrt(torch.arange(n, dtype=f64) + 0.5)
    assert_close(s, legs + p[:, None] * p[None, :], f64)
    lam, v = hippo_n_eig(n)
    assert_close(lam.real, torch.full((n,), -0.5, dtype=f64), f64)
    assert_close(v @ torch.diag(lam) @ v.conj().T, s.to(c128), f64)
    assert_close(v.conj().T @ v, torch.eye(n, dtype=c128), f64)
    # Conjugate pairs: the first half mirrors the second.
    assert_close(lam[: n // 2], lam[n // 2:].flip(0).conj(), f64)


def s5_expected(layer, u, h0=None):
    """The layer's math in float64 on the reference scan."""
    lam_bar, b_bar = (t.detach().to(c128) for t in layer.discretize())
    c = torch.view_as_complex(layer.C.detach()).to(c128)
    u64 = u.detach().to(f64)
    bu = (u64.to(c128) @ b_bar.T).transpose(1, 2)  # [B, N, L]
    a = lam_bar[None, :, None].expand(bu.shape)
    h = reference.linear_scan(a, bu, None if h0 is None else h0.to(c128))
    y = h.transpose(1, 2) @ c[0].T
    if layer.bidirectional:
        y = y + reference.linear_scan(a, bu, reverse=True).transpose(1, 2) @ c[1].T
    return 2 * y.real + layer.D.detach().to(f64) * u64


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("blocks", [1, 2], ids=["J1", "J2"])
def test_s5_matches_reference_math(bidirectional, blocks, device):
    layer = S5(6, state_dim=16, blocks=blocks, bidirectional=bidirectional, device=device)
    u = torch.randn(3, 37, 6, device=device)
    assert_close(layer(u), s5_expected(layer, u), f32)


def test_s5_recurrent_equals_parallel(device):
    layer = S5(5, state_dim=12, blocks=3, dt_min=0.01, dt_max=0.5, device=device)
    u = torch.randn(2, 30, 5, device=device)
    h0 = torch.randn(2, 6, dtype=c64, device=device)
    y, last = layer(u, initial_state=h0, return_last_state=True)
    state = h0
    steps = []
    for t in range(u.shape[1]):
        y_t, state = layer.step(u[:, t], state)
        steps.append(y_t)
    assert_close(torch.stack(steps, dim=1), y, f32)
    assert_close(state, last, c64)
    assert_close(y, s5_expected(layer, u, h0), f32)


def test_s5_gradients_match_reference_math(device):
    layer = S5(4, state_dim=8, bidirectional=True, device=device)
    u = torch.randn(2, 25, 4, device=device, requires_grad=True)
    y = layer(u)
    g = torch.randn_like(y)
    params = [layer.Lambda_re, layer.Lambda_im, layer.B, layer.C, layer.D, layer.log_step]
    got = torch.autograd.grad(y, [u] + params, g)

    # The same module evaluated in float64 with the reference scan.
    ref = S5(4, state_dim=8, bidirectional=True, device=device).double()
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    u64 = u.detach().double().requires_grad_(True)
    lam_bar, b_bar = ref.discretize()
    bu = (u64.to(c128) @ b_bar.T).transpose(1, 2)
    a = lam_bar[None, :, None].expand(bu.shape)
    c = torch.view_as_complex(ref.C)
    yr = (reference.linear_scan(a, bu).transpose(1, 2) @ c[0].T
          + reference.linear_scan(a, bu, reverse=True).transpose(1, 2) @ c[1].T)
    yr = 2 * yr.real + ref.D * u64
    ref_params = [ref.Lambda_re, ref.Lambda_im, ref.B, ref.C, ref.D, ref.log_step]
    want = torch.autograd.grad(yr, [u64] + ref_params, g.double())
    for name, x, w in zip(["u", "Lambda_re", "Lambda_im", "B", "C", "D", "log_step"], got, want):
        assert_close(x, w, f32, name)


def test_s5_trains(device):
    """Learn an exponential moving average of the input (a linear time-invariant target)."""
    torch.manual_seed(1)
    batch, length, channels = 16, 64, 2
    layer = S5(channels, state_dim=16, dt_min=0.01, dt_max=0.5, device=device)
    opt = torch.optim.Adam(layer.parameters(), lr=2e-2)
    decay = torch.tensor([0.9, 0.7], device=device)

    def batch_data():
        u = torch.randn(batch, length, channels, device=device)
        target = reference.linear_scan(decay[None, :, None].expand(batch, channels, length).double(),
                                       u.transpose(1, 2).double()).transpose(1, 2).float()
        return u, target

    start = time.perf_counter()
    losses = []
    for _ in range(150):
        u, target = batch_data()
        loss = torch.nn.functional.mse_loss(layer(u), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.1 * first, f"loss {first:.3f} -> {last:.3f}"
    assert time.perf_counter() - start < 60


def test_s5_bad_arguments(device):
    assert_raises_naming(ValueError, "state_dim", S5, 4, state_dim=7)
    assert_raises_naming(ValueError, "state_dim", S5, 4, state_dim=8, blocks=3)
    assert_raises_naming(ValueError, "d_model", S5, 0)
    layer = S5(4, state_dim=8, device=device)
    assert_raises_naming(ValueError, "u", layer, torch.randn(2, 5, 3, device=device))
    assert_raises_naming(ValueError, "u", layer.step, torch.randn(2, 3, device=device), layer.allocate_state(2))
    bi = S5(4, state_dim=8, bidirectional=True, device=device)
    assert_raises_naming(RuntimeError, "step", bi.step, torch.randn(2, 4, device=device), bi.allocate_state(2))
