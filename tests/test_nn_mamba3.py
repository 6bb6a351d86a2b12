"""nn.Mamba3: mamba_ssm's parameter layout, forward and gradients against the float64 reference
scan, decoding steps equal to the forward, carried states."""
import copy

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference
from ssm_kernels.nn import Mamba3
from ssm_kernels.testing import assert_close

CONFIGS = {
    "siso": dict(d_model=16, d_state=8, headdim=8, chunk_size=4),
    "siso-norm-rope1": dict(d_model=16, d_state=8, headdim=8, chunk_size=4, is_outproj_norm=True, rope_fraction=1.0),
    "mimo2-g2": dict(d_model=16, d_state=8, headdim=8, chunk_size=4, is_mimo=True, mimo_rank=2, ngroups=2),
}


def make(cfg):
    torch.manual_seed(0)
    layer = Mamba3(**CONFIGS[cfg])
    with torch.no_grad():  # move the parameters off their symmetric initial values
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_mamba3_state_dict_layout(cfg):
    layer = make(cfg)
    c = CONFIGS[cfg]
    H, P, N = 2 * c["d_model"] // c["headdim"], c["headdim"], c["d_state"]
    R = c.get("mimo_rank", 4) if c.get("is_mimo") else 1
    G = c.get("ngroups", 1)
    pairs = int(N * c.get("rope_fraction", 0.5)) // 2
    want = {
        "in_proj.weight": (2 * 2 * c["d_model"] + 2 * N * G * R + 3 * H + pairs, c["d_model"]),
        "dt_bias": (H,), "B_bias": (H, R, N), "C_bias": (H, R, N), "B_norm.weight": (N,), "C_norm.weight": (N,),
        "D": (H,), "out_proj.weight": (c["d_model"], 2 * c["d_model"]),
    }
    if c.get("is_mimo"):
        want.update({"mimo_x": (H, R, P), "mimo_z": (H, R, P), "mimo_o": (H, R, P)})
    if c.get("is_outproj_norm"):
        want["norm.weight"] = (2 * c["d_model"],)
    got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert got == want
    Mamba3(**c).load_state_dict(layer.state_dict(), strict=True)


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_mamba3_forward_grads_match_reference(cfg, monkeypatch):
    layer = make(cfg)
    ref = copy.deepcopy(layer).double()
    u = torch.randn(2, 11, 16, requires_grad=True)
    u64 = u.detach().double().requires_grad_(True)
    out = layer(u)
    g = torch.randn_like(out)
    out.backward(g)
    monkeypatch.setattr(ssm_kernels, "mamba3_scan", reference.mamba3_scan)
    out64 = ref(u64)
    out64.backward(g.double())
    assert_close(out, out64, torch.float32, "out")
    params64 = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        assert_close(p.grad, params64[name].grad, torch.float32, f"grad {name}")
    assert_close(u.grad, u64.grad, torch.float32, "grad u")


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_mamba3_step_and_pieces_match_forward(cfg):
    layer = make(cfg)
    u = torch.randn(3, 9, 16)
    with torch.no_grad():
        full, final = layer(u, return_final_states=True)
        first, states = layer(u[:, :5], return_final_states=True)
        rest, final2 = layer(u[:, 5:7], initial_states=states, return_final_states=True)
        assert_close(torch.cat([first, rest], 1), full[:, :7], torch.float32, "two pieces")
        for t in range(7, 9):
            assert_close(layer.step(u[:, t], final2), full[:, t], torch.float32, f"step {t}")
        for name, a, b in zip(("ssm", "k", "v"), final2[1:], final[1:]):
            assert_close(a, b, torch.float32, f"{name} state after steps")
        cache = layer.allocate_inference_cache(3)
        for t in range(3):
            assert_close(layer.step(u[:, t], cache), full[:, t], torch.float32, f"step {t} from zeros")


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_mamba3_packed_equals_each_sequence_alone(cfg):
    """forward(u, cu_seqlens=...) on packed sequences equals the layer on each sequence alone:
    outputs, per-sequence final states, and the gradients of u, the initial states and every
    parameter; the final states continue each sequence through step()."""
    layer = make(cfg)
    lens = [5, 0, 9, 1, 6]
    S, T = len(lens), sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    u = torch.randn(1, T, 16)
    init = [torch.randn_like(s) for s in layer.allocate_inference_cache(S)]
    g_out = torch.randn(1, T, 16)
    g_final = [torch.randn_like(s) for s in init]

    def backward(out, final):
        ((out * g_out).sum() + sum((f * g).sum() for f, g in zip(final, g_final))).backward()

    u1, init1 = u.clone().requires_grad_(True), [s.clone().requires_grad_(True) for s in init]
    out, final = layer(u1, initial_states=init1, return_final_states=True, cu_seqlens=cu)
    assert out.shape == u.shape and [f.shape[0] for f in final] == [S] * 4
    backward(out, final)
    packed = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()

    u2, init2 = u.clone().requires_grad_(True), [s.clone().requires_grad_(True) for s in init]
    outs, finals = [], []
    for s, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        rows = [t[s:s + 1] for t in init2]
        if a == b:
            outs.append(u2[:, a:b] * 0)
            finals.append(rows)
            continue
        o, f = layer(u2[:, a:b], initial_states=rows, return_final_states=True)
        outs.append(o)
        finals.append(f)
    alone_out = torch.cat(outs, 1)
    alone_final = [torch.cat(f) for f in zip(*finals)]
    backward(alone_out, alone_final)
    assert_close(out, alone_out.double(), torch.float32, "out")
    for name, a, b in zip(("angle", "ssm", "k", "v"), final, alone_final):
        assert_close(a, b.double(), torch.float32, f"final {name}")
    assert_close(u1.grad, u2.grad.double(), torch.float32, "grad u")
    for name, a, b in zip(("angle", "ssm", "k", "v"), init1, init2):
        assert_close(a.grad, b.grad.double(), torch.float32, f"grad initial {name}")
    for name, p in layer.named_parameters():
        assert_close(packed[name], p.grad.double(), torch.float32, f"grad {name}")
    with torch.no_grad():
        states = [f.detach().clone() for f in final]
        nxt = torch.randn(S, 16)
        stepped = layer.step(nxt, states)
        for s in range(S):
            rows = [f[s:s + 1].detach() for f in final]
            one = layer(nxt[s:s + 1, None], initial_states=rows)
            assert_close(stepped[s:s + 1], one[:, 0].double(), torch.float32, f"step of sequence {s}")
