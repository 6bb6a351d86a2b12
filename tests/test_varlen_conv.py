"""causal_conv1d on packed variable-length sequences (cu_seqlens) against the float64 reference run
on each sequence alone: outputs, per-sequence final states, every gradient, and the decode step
that continues each sequence from its final state."""
import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
NAMES = ("x", "weight", "bias", "initial_states")


@pytest.fixture(params=["segments", "extended-row"])
def conv_path(request):
    """Packed causal_conv1d through the CPU kernels' segments, or through the extended row that
    CUDA runs (forced on the CPU by a test switch)."""
    previous = torch.ops.ssm_kernels_test.set_causal_conv1d_packed_extended_row(request.param == "extended-row")
    yield request.param
    torch.ops.ssm_kernels_test.set_causal_conv1d_packed_extended_row(previous)


@pytest.fixture(params=["per-sequence", "gapped-row"])
def fft_path(request):
    """Packed fftconv through the CPU kernels' per-sequence convolutions, or through the row with
    gaps that CUDA runs (forced on the CPU by a test switch)."""
    previous = torch.ops.ssm_kernels_test.set_fftconv_packed_gapped_row(request.param == "gapped-row")
    yield request.param
    torch.ops.ssm_kernels_test.set_fftconv_packed_gapped_row(previous)


def make_case(lens, dim, width, dtype, device, *, bias=True, init=False, layout="contiguous",
              index_dtype=torch.int32):
    L = sum(lens)
    if layout == "channel-last":
        x = testing.make_channel_last(testing.make_tensor((1, dim, L), dtype, device))
    else:
        x = testing.make_tensor((1, dim, L), dtype, device, strided=layout == "strided")
    param = F64 if dtype == F64 else F32
    return {
        "x": x,
        "weight": testing.make_tensor((dim, width), param, device, scale=width**-0.5),
        "bias": testing.make_tensor((dim,), param, device) if bias else None,
        "initial_states": testing.make_tensor((len(lens), dim, width - 1), dtype, device) if init else None,
        "cu_seqlens": testing.seq_offsets(lens, device, index_dtype),
    }


def reference_packed(x, weight, bias, initial_states, cu_seqlens, activation):
    off = cu_seqlens.tolist()
    outs, finals = [], []
    for s in range(len(off) - 1):
        init = None if initial_states is None else initial_states[s:s + 1]
        y, fin = reference.causal_conv1d(x[:, :, off[s]:off[s + 1]], weight, bias, activation, initial_states=init,
                                         return_final_states=True)
        outs.append(y)
        finals.append(fin[0])
    return torch.cat(outs, -1), torch.stack(finals)


def run_ours(case, activation):
    leaves = {k: (testing.clone_leaf(v) if k in NAMES else v) for k, v in case.items()}
    out, fin = ssm_kernels.causal_conv1d(**leaves, activation=activation, return_final_states=True)
    return leaves, out, fin


def compare(case, activation, dtype):
    ours_in, out, fin = run_ours(case, activation)
    ref_in = {k: (testing.clone_leaf(v, F64) if k in NAMES else v) for k, v in case.items()}
    ref_out, ref_fin = reference_packed(**ref_in, activation=activation)
    assert out.dtype == dtype and fin.dtype == dtype and fin.shape == ref_fin.shape
    testing.assert_close(out, ref_out, dtype, "out")
    testing.assert_close(fin, ref_fin, dtype, "final_states")
    g_out = torch.randn_like(ref_out).to(dtype).to(F64)
    g_fin = torch.randn_like(ref_fin).to(dtype).to(F64)
    names = [k for k in NAMES if case[k] is not None]
    got = testing.grads([out, fin], [ours_in[k] for k in names], [g_out.to(dtype), g_fin.to(dtype)])
    want = testing.grads([ref_out, ref_fin], [ref_in[k] for k in names], [g_out, g_fin])
    for name, a, e in zip(names, got, want):
        assert a is not None and a.shape == case[name].shape and a.dtype == case[name].dtype, name
        testing.assert_close(a, e, dtype, f"grad {name}")


# lengths: empty, 1, shorter than the width, around the kernels' 512 chunk, an empty one last
CASES = [
    ([5, 0, 1, 2, 40, 3, 0], 4, F32, dict(init=True), "silu"),
    ([0, 1, 7, 513, 2], 8, F16, dict(init=True, layout="channel-last"), None),
    ([3, 3, 0, 30], 2, BF16, dict(init=True, bias=False), "silu"),
    ([9, 1, 0, 20], 5, F64, dict(init=True), "silu"),
    ([17, 1, 2, 0, 33], 3, F32, dict(layout="strided"), None),
    ([60], 4, BF16, dict(), "silu"),
]


@pytest.mark.parametrize("lens,width,dtype,opts,activation", CASES,
                         ids=[f"{'-'.join(map(str, c[0]))}-W{c[1]}-{testing.dtype_id(c[2])}" for c in CASES])
def test_varlen_conv_matches_each_sequence_alone(lens, width, dtype, opts, activation, device, conv_path):
    compare(make_case(lens, 6, width, dtype, device, **opts), activation, dtype)


def test_varlen_conv_int64_offsets(device):
    compare(make_case([4, 0, 11], 3, 4, F32, device, init=True, index_dtype=torch.int64), "silu", F32)


def test_varlen_conv_strided_equals_contiguous(device, conv_path):
    case = make_case([9, 0, 2, 30], 5, 4, F32, device, init=True, layout="strided")
    testing.assert_runs_equal(run_ours(case, "silu"), run_ours(testing.contiguous_copies(case), "silu"), NAMES)


def test_varlen_conv_no_leakage_and_deterministic(device, conv_path):
    lens = [10, 2, 25, 7]
    case = make_case(lens, 4, 4, F32, device, init=True)
    l1, out1, fin1 = run_ours(case, "silu")
    g_out, g_fin = torch.randn_like(out1), torch.randn_like(fin1)
    g1 = testing.grads([out1, fin1], [l1["x"], l1["initial_states"]], [g_out, g_fin])
    l1b, out1b, fin1b = run_ours(case, "silu")
    g1b = testing.grads([out1b, fin1b], [l1b[k] for k in NAMES], [g_out, g_fin])
    other = dict(case)
    a, b = 12, 37  # the third sequence
    other["x"] = case["x"].clone()
    other["x"][..., a:b] += 1.0
    other["initial_states"] = case["initial_states"].clone()
    other["initial_states"][2] += 1.0
    l2, out2, fin2 = run_ours(other, "silu")
    g2 = testing.grads([out2, fin2], [l2["x"], l2["initial_states"]], [g_out, g_fin])
    keep = torch.ones(sum(lens), dtype=torch.bool, device=device)
    keep[a:b] = False
    assert torch.equal(out1[..., keep], out2[..., keep])
    assert torch.equal(fin1[[0, 1, 3]], fin2[[0, 1, 3]])
    assert torch.equal(g1[0][..., keep], g2[0][..., keep])
    assert torch.equal(g1[1][[0, 1, 3]], g2[1][[0, 1, 3]])
    # deterministic: the same call twice gives bitwise equal gradients
    l3, out3, fin3 = run_ours(case, "silu")
    g3 = testing.grads([out3, fin3], [l3[k] for k in NAMES], [g_out, g_fin])
    for name, t1, t3 in zip(NAMES, g1b, g3):
        assert torch.equal(t1, t3), name


def test_varlen_conv_decode_continues_each_sequence(device, conv_path):
    """A packed prefill's final states, given to causal_conv1d_update through conv_state_indices,
    continue every sequence as if it had been run in one piece."""
    lens, width, dim = [6, 0, 2, 13], 4, 5
    case = make_case(lens, dim, width, F32, device, init=True)
    _, fin = ssm_kernels.causal_conv1d(**case, activation="silu", return_final_states=True)
    step = testing.make_tensor((len(lens), dim), F32, device)
    # the states in a larger cache, rows in reverse order
    cache = torch.zeros(len(lens) + 2, dim, width - 1, device=device)
    rows = torch.arange(len(lens) + 1, 1, -1, dtype=torch.int32, device=device)
    cache[rows.long()] = fin.detach()
    y = ssm_kernels.causal_conv1d_update(step, cache, case["weight"], case["bias"], "silu", conv_state_indices=rows)
    off = case["cu_seqlens"].tolist()
    for s in range(len(lens)):
        whole = torch.cat([case["x"][:, :, off[s]:off[s + 1]], step[s, None, :, None]], -1)
        want = reference.causal_conv1d(whole, case["weight"], case["bias"], "silu",
                                       initial_states=case["initial_states"][s:s + 1])
        testing.assert_close(y[s], want[0, :, -1], F32, f"decode step of sequence {s}")


def _op_args(case):
    return (case["x"], case["weight"], case["bias"], case["initial_states"], None, True, case["cu_seqlens"])


def test_varlen_conv_opcheck(device, conv_path):
    case = make_case([5, 0, 1, 12], 3, 4, F32, device, init=True)
    args = testing.clone_float_args(_op_args(case))
    testing.run_opcheck(torch.ops.ssm_kernels.causal_conv1d_fwd.default, args)
    dout = torch.randn_like(case["x"])
    dfinal = torch.randn(4, 3, 3, device=device)
    testing.run_opcheck(torch.ops.ssm_kernels.causal_conv1d_bwd.default,
                        (case["x"], case["weight"], case["bias"], case["initial_states"], None, dout, dfinal, True,
                         case["cu_seqlens"]))


def test_varlen_conv_compile_no_recompile_on_new_lengths(device):
    case = make_case([5, 0, 9, 12], 3, 4, F32, device, init=True)

    def fn(x, weight, bias, initial_states, cu_seqlens):
        return ssm_kernels.causal_conv1d(x, weight, bias, "silu", initial_states=initial_states,
                                         return_final_states=True, cu_seqlens=cu_seqlens)

    args = [case[k] for k in ("x", "weight", "bias", "initial_states", "cu_seqlens")]
    new_cu_seqlens = [testing.seq_offsets(lens, device) for lens in ([12, 9, 0, 5], [1, 1, 1, 23])]
    testing.check_compile_over_lengths(fn, args, new_cu_seqlens)


def test_varlen_conv_bad_inputs(device, conv_path):
    case = make_case([10, 0, 30], 3, 4, F32, device, init=True)
    base = {k: case[k] for k in ("x", "weight", "cu_seqlens")}

    def bad(exc, name, **over):
        testing.assert_raises_naming(exc, name, ssm_kernels.causal_conv1d, **{**base, **over})

    cu = case["cu_seqlens"]
    testing.assert_rejects_bad_cu_seqlens(lambda **over: ssm_kernels.causal_conv1d(**{**base, **over}), cu,
                                          {"x": torch.cat([case["x"], case["x"]])})
    bad(ValueError, "initial_states", initial_states=case["initial_states"][:2])
    with pytest.raises(ValueError, match="dfinal_states"):
        torch.ops.ssm_kernels.causal_conv1d_bwd(case["x"], case["weight"], None, None, None, torch.ones_like(case["x"]),
                                                torch.zeros(1, 3, 3, device=device), True, cu)


def fftconv_case(lens, dim, klen, dtype, device, *, k_rev=None, D=True, gates=False, index_dtype=torch.int32):
    L = sum(lens)
    kdtype = F64 if dtype == F64 else F32
    case = {
        "u": testing.make_tensor((1, dim, L), dtype, device),
        "k": testing.make_tensor((dim, klen), kdtype, device, scale=klen**-0.5),
        "D": testing.make_tensor((dim,), kdtype, device) if D else None,
        "k_rev": testing.make_tensor((dim, k_rev), kdtype, device, scale=k_rev**-0.5) if k_rev else None,
        "pregate": testing.make_tensor((1, dim, L), dtype, device) if gates else None,
        "postgate": testing.make_tensor((1, dim, L), dtype, device) if gates else None,
        "cu_seqlens": testing.seq_offsets(lens, device, index_dtype),
    }
    return case


FFT_NAMES = ("u", "k", "D", "k_rev", "pregate", "postgate")


def fftconv_reference_packed(u, k, D, k_rev, pregate, postgate, cu_seqlens, activation):
    off = cu_seqlens.tolist()
    outs = []
    for s in range(len(off) - 1):
        a, b = off[s], off[s + 1]
        if a == b:
            outs.append(u[:, :, a:b].to(F64))
            continue
        cut = (lambda t: None if t is None else t[:, :, a:b])
        outs.append(reference.fftconv(u[:, :, a:b], k, D=D, k_rev=k_rev, pregate=cut(pregate), postgate=cut(postgate),
                                      activation=activation))
    return torch.cat(outs, -1)


# kernels shorter and longer than the sequences and than the row, with and without k_rev and gates;
# the last case's sequences take both CPU FFTs (hand-written powers of two, ATen's 1080 and 1125)
FFT_CASES = [
    ([5, 0, 1, 40, 17, 0], 8, F32, dict(gates=True), "gelu"),
    ([30, 2, 0, 11], 64, F32, dict(k_rev=5), None),
    ([0, 33, 1, 20], 100, F16, dict(gates=True, k_rev=3), "silu"),
    ([9, 9, 40], 16, BF16, dict(D=False), None),
    ([12, 1, 25], 7, F64, dict(gates=True, k_rev=4), "silu"),
    ([1030, 5, 0, 300, 1100, 2, 1040], 9, F32, dict(gates=True, k_rev=4), "gelu"),
]


@pytest.mark.parametrize("lens,klen,dtype,opts,activation", FFT_CASES,
                         ids=[f"{'-'.join(map(str, c[0]))}-K{c[1]}-{testing.dtype_id(c[2])}" for c in FFT_CASES])
def test_varlen_fftconv_matches_each_sequence_alone(lens, klen, dtype, opts, activation, device, fft_path):
    case = fftconv_case(lens, 5, klen, dtype, device, **opts)
    names = [n for n in FFT_NAMES if case[n] is not None]
    ours_in = {k: (testing.clone_leaf(v) if k in names else v) for k, v in case.items()}
    ref_in = {k: (testing.clone_leaf(v, F64) if k in names else v) for k, v in case.items()}
    out = ssm_kernels.fftconv(**ours_in, activation=activation)
    ref_out = fftconv_reference_packed(**ref_in, activation=activation)
    assert out.dtype == dtype
    testing.assert_close(out, ref_out, dtype, "out")
    g = torch.randn_like(ref_out).to(dtype).to(F64)
    got = testing.grads([out], [ours_in[n] for n in names], [g.to(dtype)])
    want = testing.grads([ref_out], [ref_in[n] for n in names], [g])
    for name, a, e in zip(names, got, want):
        assert a is not None and a.shape == case[name].shape and a.dtype == case[name].dtype, name
        testing.assert_close(a, e, dtype, f"grad {name}")


def test_varlen_fftconv_no_leakage_and_deterministic(device, fft_path):
    lens = [10, 2, 25, 7, 600]
    case = fftconv_case(lens, 4, 50, F32, device, k_rev=6, gates=True, index_dtype=torch.int64)
    names = list(FFT_NAMES)

    def run(c):
        leaves = {k: (testing.clone_leaf(v) if k in names else v) for k, v in c.items()}
        out = ssm_kernels.fftconv(**leaves, activation="gelu")
        return out, testing.grads([out], [leaves[n] for n in names], [g_out])

    g_out = torch.randn(1, 4, sum(lens), device=device)
    testing.assert_deterministic(lambda: (lambda out, g: [out, *g])(*run(case)))
    out1, g1 = run(case)
    other = dict(case)
    a, b = 12, 37  # the third sequence
    for name in ("u", "pregate", "postgate"):
        other[name] = case[name].clone()
        other[name][..., a:b] += 1.0
    out2, g2 = run(other)
    keep = torch.ones(sum(lens), dtype=torch.bool, device=device)
    keep[a:b] = False
    assert testing.rel_error(out1[..., ~keep], out2[..., ~keep]) > 1e-2
    token_grads = [names.index(name) for name in ("u", "pregate", "postgate")]
    if device == "cpu" and fft_path == "per-sequence":
        # Each sequence is its own FFT: the others' outputs and input gradients are bitwise unchanged.
        assert torch.equal(out2[..., keep], out1[..., keep])
        for i in token_grads:
            assert torch.equal(g2[i][..., keep], g1[i][..., keep]), names[i]
    else:
        # One FFT spans the whole row with gaps, so the other sequences see the change as FFT
        # rounding only (not bitwise): within float32 rounding.
        testing.assert_close(out2[..., keep], out1[..., keep], F32, "outputs of the unchanged sequences")
        for i in token_grads:
            testing.assert_close(g2[i][..., keep], g1[i][..., keep], F32,
                                 f"grad {names[i]} of the unchanged sequences")


def test_varlen_fftconv_strided_equals_contiguous(device, fft_path):
    case = fftconv_case([9, 0, 30, 2, 70], 3, 12, F32, device, k_rev=3, gates=True)
    tokens = ("u", "pregate", "postgate")
    results = []
    for strided in (True, False):
        leaves = {k: (testing.clone_leaf(v) if k in FFT_NAMES else v) for k, v in case.items()}
        args = dict(leaves)
        if strided:
            for name in tokens:
                # every other element of a leaf's last axis: the kernels read the view's strides
                leaves[name] = testing.clone_leaf(torch.stack([case[name], torch.zeros_like(case[name])], -1))
                args[name] = leaves[name][..., 0]
                assert not args[name].is_contiguous()
        out = ssm_kernels.fftconv(**args, activation="silu")
        g = testing.grads([out], [leaves[n] for n in FFT_NAMES], [torch.ones_like(out)])
        results.append((out, [x[..., 0] if strided and n in tokens else x for n, x in zip(FFT_NAMES, g)]))
    (out1, g1), (out2, g2) = results
    assert torch.equal(out1, out2)
    for name, a, b in zip(FFT_NAMES, g1, g2):
        assert torch.equal(a, b), name


def test_varlen_fftconv_opcheck_and_compile(device):
    case = fftconv_case([5, 0, 9, 12], 3, 30, F32, device, k_rev=4, gates=True)
    args = (case["u"], case["k"], case["D"], case["k_rev"], case["pregate"], case["postgate"], 1, case["cu_seqlens"])
    testing.run_opcheck(torch.ops.ssm_kernels.fftconv_fwd.default, testing.clone_float_args(args))

    def fn(u, k, cu_seqlens):
        return ssm_kernels.fftconv(u, k, activation="gelu", cu_seqlens=cu_seqlens)

    args = [case["u"], case["k"], case["cu_seqlens"]]
    new_cu_seqlens = [testing.seq_offsets(lens, device) for lens in ([12, 9, 0, 5], [1, 1, 1, 23])]
    testing.check_compile_over_lengths(fn, args, new_cu_seqlens)


def test_varlen_fftconv_bad_inputs(device):
    case = fftconv_case([10, 0, 30], 3, 8, F32, device)
    base = {"u": case["u"], "k": case["k"], "cu_seqlens": case["cu_seqlens"]}
    cu = case["cu_seqlens"]
    testing.assert_rejects_bad_cu_seqlens(lambda **over: ssm_kernels.fftconv(**{**base, **over}), cu,
                                          {"u": torch.cat([case["u"], case["u"]])}, takes_seq_idx=False)
