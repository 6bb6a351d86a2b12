"""nn.Mamba against a float64 composition of reference ops, decoding, pieces, checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

from ssm_kernels import reference as R
from ssm_kernels import testing
from ssm_kernels.nn import Mamba

F32 = torch.float32


def mamba_reference(p, hs, m, conv_state=None, ssm_state=None):
    """Mamba-1 mixer in float64 from reference ops and plain torch, with the weights in p."""
    xz = F.linear(hs.to(torch.float64), p["in_proj.weight"], p.get("in_proj.bias"))  # [B, L, 2D]
    x, z = xz.chunk(2, dim=-1)
    x, z = x.transpose(1, 2), z.transpose(1, 2)  # [B, D, L]
    init = None if conv_state is None else conv_state[..., -(m.d_conv - 1):]
    xc, conv_final = R.causal_conv1d(x, p["conv1d.weight"][:, 0], p.get("conv1d.bias"), "silu",
                                     initial_states=init, return_final_states=True)
    dt, B, C = torch.split(F.linear(xc.transpose(1, 2), p["x_proj.weight"]),
                           [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.linear(dt, p["dt_proj.weight"]).transpose(1, 2)  # [B, D, L]
    y, last = R.selective_scan(xc, dt, -torch.exp(p["A_log"]), B.transpose(1, 2), C.transpose(1, 2),
                               D=p["D"], z=z, delta_bias=p["dt_proj.bias"], delta_softplus=True,
                               initial_state=ssm_state, return_last_state=True)
    out = F.linear(y.transpose(1, 2), p["out_proj.weight"], p.get("out_proj.bias"))
    return out, conv_final, last


CONFIGS = {
    "L1-N4": dict(L=1, d_model=8, d_state=4),
    "L17-N16": dict(L=17, d_model=16, d_state=16),
    "L40-N8-bias-noconvbias-W2": dict(L=40, d_model=8, d_state=8, bias=True, conv_bias=False, d_conv=2),
    "L33-N8-rank3-W8-expand1.5": dict(L=33, d_model=12, d_state=8, dt_rank=3, d_conv=8, expand=1.5),
}


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_mamba_forward_grads_match_reference(cfg, device):
    cfg = dict(cfg)
    L = cfg.pop("L")
    m = Mamba(**cfg, device=device)
    with torch.no_grad():  # move dt away from its tiny init so the scan matters
        m.dt_proj.bias.add_(1.0)
    x = testing.make_tensor((2, L, m.d_model), F32, device, requires_grad=True)
    testing.check_module_matches_reference(m, x, lambda p64, x64: mamba_reference(p64, x64, m)[0])


@pytest.mark.parametrize("L", [1, 9])
def test_mamba_step_matches_forward(L, device):
    m = Mamba(16, d_state=8, device=device)
    x = testing.make_tensor((3, L, 16), F32, device)
    with torch.no_grad():
        full = m(x)
        conv_state, ssm_state = m.allocate_inference_cache(3, L)
        assert conv_state.shape == (3, m.d_inner, m.d_conv) and ssm_state.shape == (3, m.d_inner, 8)
        outs = []
        for t in range(L):
            out, conv_state2, ssm_state2 = m.step(x[:, t:t + 1], conv_state, ssm_state)
            assert conv_state2 is conv_state and ssm_state2 is ssm_state  # in place
            outs.append(out)
    testing.assert_close(torch.cat(outs, dim=1), full, F32, name="decoded outputs")
    _, conv_final, ssm_final = m(x, return_final_states=True)
    testing.assert_close(ssm_state, ssm_final, F32, name="ssm_state")
    testing.assert_close(conv_state, conv_final, F32, name="conv_state")


@pytest.mark.parametrize("split", [1, 6, 12])
def test_mamba_two_pieces_equal_one_pass(split, device):
    m = Mamba(8, d_state=8, d_conv=4, device=device)
    x = testing.make_tensor((2, 13, 8), F32, device, requires_grad=True)
    testing.check_two_pieces_equal_one_pass(m, x, split)


def test_mamba_carried_states_match_reference():
    m = Mamba(8, d_state=4)
    x = testing.make_tensor((2, 7, 8), F32)
    conv_state = testing.make_tensor((2, m.d_inner, m.d_conv), F32)
    ssm_state = testing.make_tensor((2, m.d_inner, 4), F32)
    out, conv_new, ssm_new = m(x, conv_state=conv_state, ssm_state=ssm_state, return_final_states=True)
    out64, conv64, ssm64 = mamba_reference(testing.params_float64(m), x.double(), m, conv_state.double(), ssm_state.double())
    testing.assert_close(out, out64, F32)
    testing.assert_close(conv_new[..., 1:], conv64, F32, name="conv_state")
    testing.assert_close(ssm_new, ssm64, F32, name="ssm_state")


def test_mamba_inference_params_protocol():
    m = Mamba(8, d_state=4, layer_idx=0)
    testing.check_inference_params_decoding(m, testing.make_tensor((2, 10, 8), F32), prompt=6)


def expected_mamba_layout(d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False):
    d_inner = int(expand * d_model)
    rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
    shapes = {
        "in_proj.weight": (2 * d_inner, d_model),
        "conv1d.weight": (d_inner, 1, d_conv),
        "x_proj.weight": (rank + 2 * d_state, d_inner),
        "dt_proj.weight": (d_inner, rank),
        "dt_proj.bias": (d_inner,),
        "A_log": (d_inner, d_state),
        "D": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    if conv_bias:
        shapes["conv1d.bias"] = (d_inner,)
    if bias:
        shapes["in_proj.bias"] = (2 * d_inner,)
        shapes["out_proj.bias"] = (d_model,)
    return shapes


@pytest.mark.parametrize("kwargs", [dict(), dict(d_state=8, d_conv=3, expand=1, dt_rank=5, conv_bias=False, bias=True)],
                         ids=["default", "variant"])
def test_mamba_state_dict_layout_loads_strict(kwargs):
    d_model = 40
    shapes = expected_mamba_layout(d_model, **kwargs)
    testing.check_state_dict_layout(Mamba(d_model, **kwargs), shapes)


def test_mamba_initialisation():
    m = Mamba(32, d_state=8, dt_min=0.01, dt_max=0.05, dt_scale=2.0)
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 9, dtype=F32)).repeat(64, 1))
    assert torch.equal(m.D, torch.ones(64))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert m.dt_proj.weight.abs().max() <= 2.0 * m.dt_rank ** -0.5
    c = Mamba(32, dt_init="constant")
    assert torch.equal(c.dt_proj.weight, torch.full_like(c.dt_proj.weight, c.dt_rank ** -0.5))
    assert m.A_log.dtype == F32 and Mamba(8, dtype=torch.float64).in_proj.weight.dtype == torch.float64


def test_mamba_matches_hf_mamba_mixer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba.modeling_mamba import MambaMixer

    cfg = transformers.MambaConfig(hidden_size=24, state_size=8, conv_kernel=4, expand=2, time_step_rank=3,
                                   use_conv_bias=True, use_bias=True, num_hidden_layers=1)
    hf = MambaMixer(cfg, layer_idx=0).eval()
    m = Mamba(24, d_state=8, d_conv=4, expand=2, dt_rank=3, conv_bias=True, bias=True)
    testing.check_loads_peer_weights(m, hf, testing.make_tensor((2, 19, 24), F32), "MambaMixer")


@pytest.mark.parametrize("kwargs,name", [
    (dict(d_model=0), "d_model"),
    (dict(d_model=8, d_state=0), "d_state"),
    (dict(d_model=8, d_conv=1), "d_conv"),
    (dict(d_model=8, d_conv=9), "d_conv"),
    (dict(d_model=8, expand=0), "expand"),
    (dict(d_model=8, dt_rank=0), "dt_rank"),
    (dict(d_model=8, dt_init="xavier"), "dt_init"),
    (dict(d_model=8, dt_min=0.0), "dt_min"),
    (dict(d_model=8, dt_min=0.1, dt_max=0.01), "dt_max"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_mamba_bad_constructor_arguments(kwargs, name):
    testing.assert_raises_naming(ValueError, name, Mamba, **kwargs)


def test_mamba_bad_call_arguments():
    m = Mamba(8, d_state=4)
    testing.assert_raises_naming(ValueError, "hidden_states", m, torch.randn(2, 5, 9))
    testing.assert_raises_naming(ValueError, "hidden_states", m.step, *(torch.randn(2, 2, 8),) + m.allocate_inference_cache(2, 4))
    testing.assert_raises_naming(ValueError, "ssm_state", m, torch.randn(2, 5, 8), ssm_state=torch.zeros(2, 16, 5))
    testing.assert_raises_naming(ValueError, "conv_state", m, torch.randn(2, 5, 8), conv_state=torch.zeros(2, 16, 2))
    testing.assert_raises_naming(ValueError, "layer_idx", m, torch.randn(2, 5, 8), testing.InferenceParams(5, 2))
