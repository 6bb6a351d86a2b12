"""nn.Mamba2 against a float64 composition of reference ops, decoding, pieces, packed batches,
checkpoints."""

import pytest
import torch
import torch.nn.functional as F

from ssm_kernels import reference as R
from ssm_kernels import testing
from ssm_kernels.nn import Mamba2, RMSNormGated

F32 = torch.float32


def gated_rmsnorm64(y, z, weight, group_size, norm_before_gate, eps=1e-5):
    if z is not None and not norm_before_gate:
        y = y * F.silu(z)
    g = y.unflatten(-1, (-1, group_size))
    out = (g / torch.sqrt(g.square().mean(-1, keepdim=True) + eps)).flatten(-2) * weight
    return out * F.silu(z) if z is not None and norm_before_gate else out


def mamba2_reference(p, u, m, seq_idx=None, conv_state=None, ssm_state=None):
    """Mamba-2 mixer in float64 from reference ops and plain torch, with the weights in p."""
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    d_mlp = m.d_inner - m.d_ssm
    zxbcdt = F.linear(u.to(torch.float64), p["in_proj.weight"], p.get("in_proj.bias"))
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.conv_dim, H], dim=-1)
    init = None if conv_state is None else conv_state[..., -(m.d_conv - 1):]
    xBC, conv_final = R.causal_conv1d(xBC.transpose(1, 2), p["conv1d.weight"][:, 0], p.get("conv1d.bias"), "silu",
                                      initial_states=init, return_final_states=True, seq_idx=seq_idx)
    x, B, C = torch.split(xBC.transpose(1, 2), [m.d_ssm, G * N, G * N], dim=-1)
    D = p["D"].view(H, P) if m.D_has_hdim else p["D"]
    y, last = R.ssd_scan(x.unflatten(-1, (H, P)), dt, -torch.exp(p["A_log"]), B.unflatten(-1, (G, N)),
                         C.unflatten(-1, (G, N)), D=D, z=None if m.rmsnorm else z.unflatten(-1, (H, P)),
                         dt_bias=p["dt_bias"], dt_softplus=True, dt_limit=m.dt_limit, initial_states=ssm_state,
                         seq_idx=seq_idx, return_final_states=True)
    y = y.flatten(-2)
    if m.rmsnorm:
        y = gated_rmsnorm64(y, z, p["norm.weight"], m.d_ssm // G, m.norm_before_gate)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias")), conv_final, last


CONFIGS = {
    "L1-H4": dict(L=1, d_model=16, d_state=8, headdim=8),
    "L15-chunk16-G2": dict(L=15, d_model=16, d_state=8, headdim=8, ngroups=2, chunk_size=16),
    "L17-chunk16-Dhdim-bias": dict(L=17, d_model=16, d_state=16, headdim=4, chunk_size=16, D_has_hdim=True, bias=True),
    "L33-chunk16-nonorm-W3": dict(L=33, d_model=8, d_state=8, headdim=4, chunk_size=16, rmsnorm=False, d_conv=3),
    "L32-chunk16-normfirst-dssm-dtlimit": dict(L=32, d_model=16, d_state=8, headdim=8, chunk_size=16, d_ssm=16,
                                              norm_before_gate=True, dt_limit=(0.05, 0.2), ngroups=2),
}


@pytest.mark.parametrize("cfg", list(CONFIGS.values()), ids=list(CONFIGS))
def test_mamba2_forward_grads_match_reference(cfg, device):
    cfg = dict(cfg)
    L = cfg.pop("L")
    m = Mamba2(**cfg, device=device)
    x = testing.make_tensor((2, L, m.d_model), F32, device, requires_grad=True)
    testing.check_module_matches_reference(m, x, lambda p64, x64: mamba2_reference(p64, x64, m)[0])


@pytest.mark.parametrize("cfg", [dict(), dict(rmsnorm=False, D_has_hdim=True), dict(d_ssm=16, dt_limit=(0.05, 0.2))],
                         ids=["default", "nonorm-Dhdim", "dssm-dtlimit"])
def test_mamba2_step_matches_forward(cfg, device):
    m = Mamba2(16, d_state=8, headdim=8, ngroups=2, chunk_size=16, **cfg, device=device)
    L = 11
    x = testing.make_tensor((2, L, 16), F32, device)
    with torch.no_grad():
        full, conv_final, ssm_final = m(x, return_final_states=True)
        conv_state, ssm_state = m.allocate_inference_cache(2, L)
        assert conv_state.shape == (2, m.conv_dim, m.d_conv)
        assert ssm_state.shape == (2, m.nheads, m.headdim, m.d_state) and ssm_state.dtype == F32
        outs = [m.step(x[:, t:t + 1], conv_state, ssm_state)[0] for t in range(L)]
    testing.assert_close(torch.cat(outs, dim=1), full, F32, name="decoded outputs")
    testing.assert_close(ssm_state, ssm_final, F32, name="ssm_state")
    testing.assert_close(conv_state, conv_final, F32, name="conv_state")


@pytest.mark.parametrize("split", [1, 16, 20])
def test_mamba2_two_pieces_equal_one_pass(split, device):
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=16, device=device)
    x = testing.make_tensor((2, 21, 16), F32, device, requires_grad=True)
    testing.check_two_pieces_equal_one_pass(m, x, split)


def test_mamba2_carried_states_match_reference():
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=16)
    x = testing.make_tensor((2, 9, 16), F32)
    conv_state = testing.make_tensor((2, m.conv_dim, m.d_conv), F32)
    ssm_state = testing.make_tensor((2, m.nheads, m.headdim, m.d_state), F32)
    out, conv_new, ssm_new = m(x, conv_state=conv_state, ssm_state=ssm_state, return_final_states=True)
    out64, conv64, ssm64 = mamba2_reference(testing.params_float64(m), x.double(), m, None, conv_state.double(), ssm_state.double())
    testing.assert_close(out, out64, F32)
    testing.assert_close(conv_new[..., 1:], conv64, F32, name="conv_state")
    testing.assert_close(ssm_new, ssm64, F32, name="ssm_state")


def test_mamba2_packed_sequences_equal_separate(device):
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=16, device=device)
    lengths = [5, 17, 3]
    seqs = [testing.make_tensor((1, n, 16), F32, device) for n in lengths]
    packed = torch.cat(seqs, dim=1)  # [1, 25, 16]
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])[None].to(device)
    with torch.no_grad():
        separate = torch.cat([m(s) for s in seqs], dim=1)
        testing.assert_close(m(packed, seq_idx=seq_idx), separate, F32, name="seq_idx")
        cu_seqlens = torch.tensor([0, 5, 22, 25], dtype=torch.int32, device=device)
        testing.assert_close(m(packed, cu_seqlens=cu_seqlens), separate, F32, name="cu_seqlens")
        flat = m(packed[0], seqlen=25, seq_idx=seq_idx)
        testing.assert_close(flat, separate[0], F32, name="flattened input")
    out64, _, _ = mamba2_reference(testing.params_float64(m), packed.double(), m, seq_idx)
    testing.assert_close(separate, out64, F32, name="vs reference with seq_idx")


def test_mamba2_inference_params_protocol():
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=16, layer_idx=3)
    params = testing.check_inference_params_decoding(m, testing.make_tensor((2, 10, 16), F32), prompt=7)
    assert 3 in params.key_value_memory_dict


def expected_mamba2_layout(d_model, d_state=128, d_conv=4, expand=2, headdim=64, d_ssm=None, ngroups=1,
                           D_has_hdim=False, rmsnorm=True, bias=False, conv_bias=True):
    d_inner = expand * d_model
    d_ssm = d_inner if d_ssm is None else d_ssm
    nheads = d_ssm // headdim
    conv_dim = d_ssm + 2 * ngroups * d_state
    shapes = {
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d.weight": (conv_dim, 1, d_conv),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (d_ssm,) if D_has_hdim else (nheads,),
        "out_proj.weight": (d_model, d_inner),
    }
    if conv_bias:
        shapes["conv1d.bias"] = (conv_dim,)
    if rmsnorm:
        shapes["norm.weight"] = (d_ssm,)
    if bias:
        shapes["in_proj.bias"] = shapes["in_proj.weight"][:1]
        shapes["out_proj.bias"] = (d_model,)
    return shapes


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(d_state=16, headdim=32, ngroups=2, d_ssm=128, D_has_hdim=True, bias=True, conv_bias=False, rmsnorm=False),
], ids=["default", "variant"])
def test_mamba2_state_dict_layout_loads_strict(kwargs):
    shapes = expected_mamba2_layout(96, **kwargs)
    testing.check_state_dict_layout(Mamba2(96, **kwargs), shapes)


def test_mamba2_initialisation():
    m = Mamba2(64, d_state=16, headdim=16, A_init_range=(2, 4), dt_min=0.01, dt_max=0.05, conv_init=0.1)
    A = torch.exp(m.A_log)
    assert A.shape == (8,) and A.min() >= 2 * (1 - 1e-6) and A.max() <= 4 * (1 + 1e-6)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 0.01 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    assert torch.equal(m.D, torch.ones(8)) and torch.equal(m.norm.weight, torch.ones(128))
    assert m.conv1d.weight.abs().max() <= 0.1
    assert m.norm.group_size == 128


def test_gated_rmsnorm_matches_formula():
    for before in (False, True):
        norm = RMSNormGated(12, group_size=4, norm_before_gate=before)
        with torch.no_grad():
            norm.weight.normal_()
        x, z = torch.randn(3, 5, 12), torch.randn(3, 5, 12)
        expected = gated_rmsnorm64(x.double(), z.double(), norm.weight.double(), 4, before)
        testing.assert_close(norm(x, z), expected, F32, name=f"norm_before_gate={before}")
        testing.assert_close(norm(x), gated_rmsnorm64(x.double(), None, norm.weight.double(), 4, before),
                             F32, name="ungated")
    testing.assert_raises_naming(ValueError, "group_size", RMSNormGated, 12, group_size=5)
    testing.assert_raises_naming(ValueError, "hidden_size", RMSNormGated, 0)


def test_mamba2_matches_hf_mamba2_mixer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = transformers.Mamba2Config(hidden_size=32, state_size=8, conv_kernel=4, expand=2, num_heads=8, head_dim=8,
                                    n_groups=2, chunk_size=16, use_conv_bias=True, use_bias=False,
                                    num_hidden_layers=1, layer_norm_epsilon=1e-5)
    hf = Mamba2Mixer(cfg, layer_idx=0).eval()
    m = Mamba2(32, d_state=8, d_conv=4, expand=2, headdim=8, ngroups=2, chunk_size=16)
    testing.check_loads_peer_weights(m, hf, testing.make_tensor((2, 37, 32), F32), "Mamba2Mixer")


@pytest.mark.parametrize("kwargs,name", testing.one_bad_argument(
    dict(d_model=16, headdim=8), d_model=[0], headdim=[12], ngroups=[3], d_ssm=[48], chunk_size=[100, 512], d_conv=[1],
    A_init_range=[(0, 4)], dt_limit=[(0.5, 0.1)], process_group=[object()]))
def test_mamba2_bad_constructor_arguments(kwargs, name):
    testing.assert_raises_naming(ValueError, name, Mamba2, **kwargs)


def test_mamba2_bad_call_arguments():
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=16)
    testing.assert_raises_naming(ValueError, "u", m, torch.randn(2, 5, 9))
    testing.assert_raises_naming(ValueError, "seq_idx", m, torch.randn(2, 5, 16), seq_idx=torch.zeros(2, 4, dtype=torch.int32))
    testing.assert_raises_naming(ValueError, "ssm_state", m, torch.randn(2, 5, 16), ssm_state=torch.zeros(2, 4, 8, 7))
    testing.assert_raises_naming(ValueError, "cu_seqlens", m, torch.randn(2, 5, 16), cu_seqlens=torch.tensor([0, 5]))
    testing.assert_raises_naming(ValueError, "hidden_states", m.step, *(torch.randn(2, 2, 16),) + m.allocate_inference_cache(2, 4))
