"""nn.LongConv (Hyena order 2) against a float64 composition of reference ops and plain torch."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ssm_kernels import reference as R
from ssm_kernels import testing
from ssm_kernels.nn import LongConv

F32, F64 = torch.float32, torch.float64


def hyena_filter64(p, m, L):
    """Hyena's implicit filter in float64, built from its definition (not from the module's buffers)."""
    bands = (m.emb_dim - 1) // 2
    t = torch.linspace(0, 1, m.l_max, dtype=F64)[None, :L, None]  # [1, L, 1]
    phase = 2 * math.pi * torch.arange(L, dtype=F64)[None, :, None] / m.l_max
    f = torch.linspace(1e-4, bands - 1, bands, dtype=F64)[None, None]
    z = torch.exp(-1j * f * phase)
    emb = torch.cat([t, z.real, z.imag], dim=-1)  # [1, L, emb_dim]
    mlp = {k[len("implicit_filter."):]: v for k, v in p.items() if k.startswith("implicit_filter.")}
    h = functional_call(m.implicit_filter, mlp, (emb,))  # [1, L, D]
    deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, m.d_model, dtype=F64)
    return (h * torch.exp(-t * deltas.abs()))[0].T  # [D, L]


def longconv64(p, m, u):
    uc = R.causal_conv1d(F.linear(u, p["in_proj.weight"], p["in_proj.bias"]).transpose(1, 2),
                         p["short_filter.weight"][:, 0], p["short_filter.bias"])  # [B, 3D, L]
    x0, x1, v = uc.split(m.d_model, dim=1)
    y = R.fftconv(v, hyena_filter64(p, m, u.shape[1]), D=p["bias"], pregate=x1, postgate=x0)
    return F.linear(y.transpose(1, 2), p["out_proj.weight"], p["out_proj.bias"])


CASES = {
    "L1": dict(L=1, l_max=1),
    "L31-lmax64-W2": dict(L=31, l_max=64, short_filter_order=2),
    "L64-lmax64-emb5": dict(L=64, l_max=64, emb_dim=5),
    "L200-lmax256-W4": dict(L=200, l_max=256, short_filter_order=4, filter_order=16),
}


@pytest.mark.parametrize("cfg", list(CASES.values()), ids=list(CASES))
def test_longconv_forward_grads_match_reference(cfg, device):
    cfg = dict(cfg)
    L = cfg.pop("L")
    m = LongConv(6, **cfg, device=device)
    x = testing.make_tensor((2, L, 6), F32, device, requires_grad=True)
    # On CPU: functional_call swaps in the CPU float64 weights.
    testing.check_module_matches_reference(m, x, lambda p64, x64: longconv64(p64, m, x64), ref_device="cpu")


def test_longconv_is_causal():
    m = LongConv(4, 32, filter_order=8)
    x = testing.make_tensor((1, 32, 4), F32)
    y = m(x)
    x2 = x.clone()
    x2[:, 20:] = torch.randn(1, 12, 4)
    testing.assert_close(m(x2)[:, :20], y[:, :20], F32, name="outputs before the change")


def test_longconv_filter_decays():
    m = LongConv(8, 512, filter_order=16)
    with torch.no_grad():
        h = m.filter(512).abs()
    # The fastest-decaying channel is modulated to about target=1e-2 by 30% of l_max.
    assert h[-1, 200:].max() < 0.05 * h[-1, :20].max()


@pytest.mark.parametrize("kwargs,name", testing.one_bad_argument(
    dict(d_model=4, l_max=8), d_model=[0], l_max=[0], emb_dim=[4, 1], short_filter_order=[9], filter_order=[0],
    target=[2.0], fast_decay_pct=[2.0]))
def test_longconv_bad_constructor_arguments(kwargs, name):
    testing.assert_raises_naming(ValueError, name, LongConv, **kwargs)


def test_longconv_bad_call_arguments():
    m = LongConv(4, 8)
    testing.assert_raises_naming(ValueError, "l_max", m, torch.randn(1, 9, 4))
    testing.assert_raises_naming(ValueError, "u", m, torch.randn(1, 8, 5))
    testing.assert_raises_naming(ValueError, "L", m.filter, 0)
