"""nn.Mamba2 and nn.LongConv on packed sequences (cu_seqlens): one packed forward equals running
each sequence on its own (outputs, per-sequence final states, every gradient), and decoding
continues each sequence from the packed prefill's states."""
import pytest
import torch

from ssm_kernels import testing
from ssm_kernels.nn import LongConv, Mamba2

F32 = torch.float32


offsets = testing.seq_offsets


def leaf(t):
    return t.detach().clone().requires_grad_(True)


MAMBA2_CONFIGS = {
    "chunk16-G2": dict(d_model=16, d_state=8, headdim=8, ngroups=2, chunk_size=16),
    "chunk16-nonorm-W3-dtlimit": dict(d_model=8, d_state=8, headdim=4, chunk_size=16, rmsnorm=False, d_conv=3,
                                      dt_limit=(0.05, 0.2), D_has_hdim=True),
}


@pytest.mark.parametrize("name", list(MAMBA2_CONFIGS))
def test_mamba2_packed_equals_each_sequence_alone(name, device):
    m = Mamba2(**MAMBA2_CONFIGS[name], device=device)
    lens = [5, 0, 17, 1, 33, 2]
    S, L = len(lens), sum(lens)
    u = torch.randn(1, L, m.d_model, device=device)
    conv0 = torch.randn(S, m.conv_dim, m.d_conv, device=device)
    ssm0 = torch.randn(S, m.nheads, m.headdim, m.d_state, device=device)
    g_out = torch.randn(1, L, m.d_model, device=device)
    g_conv = torch.randn_like(conv0)
    g_ssm = torch.randn_like(ssm0)

    u1, c1, s1 = leaf(u), leaf(conv0), leaf(ssm0)
    out, conv, ssm = m(u1, cu_seqlens=offsets(lens, device), conv_state=c1, ssm_state=s1, return_final_states=True)
    assert conv.shape == conv0.shape and ssm.shape == ssm0.shape
    ((out * g_out).sum() + (conv * g_conv).sum() + (ssm * g_ssm).sum()).backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()

    u2, c2, s2 = leaf(u), leaf(conv0), leaf(ssm0)
    off = offsets(lens, "cpu").tolist()
    outs, convs, ssms = [], [], []
    for s in range(S):
        a, b = off[s], off[s + 1]
        if a == b:
            outs.append(u2[:, a:b] * 0)
            convs.append(c2[s])
            ssms.append(s2[s])
            continue
        o, c, h = m(u2[:, a:b], conv_state=c2[s:s + 1], ssm_state=s2[s:s + 1], return_final_states=True)
        outs.append(o)
        convs.append(c[0])
        ssms.append(h[0])
    alone_out, alone_conv, alone_ssm = torch.cat(outs, 1), torch.stack(convs), torch.stack(ssms)
    ((alone_out * g_out).sum() + (alone_conv * g_conv).sum() + (alone_ssm * g_ssm).sum()).backward()

    testing.assert_close(out, alone_out, F32, "out")
    testing.assert_close(conv, alone_conv, F32, "conv_state")
    testing.assert_close(ssm, alone_ssm, F32, "ssm_state")
    for n, p in m.named_parameters():
        testing.assert_close(packed_grads[n], p.grad, F32, f"grad {n}")
    testing.assert_close(u1.grad, u2.grad, F32, "grad u")
    testing.assert_close(c1.grad, c2.grad, F32, "grad conv_state")
    testing.assert_close(s1.grad, s2.grad, F32, "grad ssm_state")


def test_mamba2_packed_prefill_then_decode(device):
    m = Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=16, device=device)
    lens = [7, 0, 20, 2]
    S, L = len(lens), sum(lens)
    u = torch.randn(1, L, m.d_model, device=device)
    nxt = torch.randn(S, 1, m.d_model, device=device)
    with torch.no_grad():
        _, conv, ssm = m(u, cu_seqlens=offsets(lens, device), return_final_states=True)
        y, _, _ = m.step(nxt, conv.clone(), ssm.clone())
        off = offsets(lens, "cpu").tolist()
        for s in range(S):
            whole = torch.cat([u[:, off[s]:off[s + 1]], nxt[s:s + 1]], 1)
            want = m(whole)[:, -1]
            testing.assert_close(y[s, 0], want[0], F32, f"decode step of sequence {s}")


def test_mamba2_packed_bad_inputs(device):
    m = Mamba2(d_model=16, d_state=8, headdim=8, chunk_size=16, device=device)
    u = torch.randn(1, 10, 16, device=device)
    cu = offsets([4, 6], device)
    testing.assert_raises_naming(ValueError, "cu_seqlens", m, u.expand(2, -1, -1), cu_seqlens=cu)
    testing.assert_raises_naming(ValueError, "cu_seqlens", m, u, cu_seqlens=cu,
                                 seq_idx=torch.zeros(1, 10, dtype=torch.int32, device=device))
    testing.assert_raises_naming(ValueError, "ssm_state", m, u, cu_seqlens=cu,
                                 ssm_state=torch.zeros(1, m.nheads, m.headdim, m.d_state, device=device))
    testing.assert_raises_naming(ValueError, "conv_state", m, u, cu_seqlens=cu,
                                 conv_state=torch.zeros(3, m.conv_dim, m.d_conv, device=device))


def test_longconv_packed_equals_each_sequence_alone(device):
    m = LongConv(d_model=8, l_max=40, device=device)
    lens = [5, 0, 17, 1, 40, 2]
    L = sum(lens)  # more than l_max: allowed when packed
    u = torch.randn(1, L, 8, device=device)
    g = torch.randn(1, L, 8, device=device)
    u1 = leaf(u)
    out = m(u1, cu_seqlens=offsets(lens, device))
    (out * g).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    u2 = leaf(u)
    off = offsets(lens, "cpu").tolist()
    alone = torch.cat([m(u2[:, off[s]:off[s + 1]]) if off[s] < off[s + 1] else u2[:, :0] * 0
                       for s in range(len(lens))], 1)
    (alone * g).sum().backward()
    testing.assert_close(out, alone, F32, "out")
    for n, p in m.named_parameters():
        testing.assert_close(packed_grads[n], p.grad, F32, f"grad {n}")
    testing.assert_close(u1.grad, u2.grad, F32, "grad u")
