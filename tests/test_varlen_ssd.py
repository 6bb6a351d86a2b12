"""ssd_scan on packed variable-length sequences (cu_seqlens) against the float64 reference run on
each sequence alone: outputs, per-sequence final states and every gradient."""
import math

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing
from test_ssd import run_with_grads as run

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


offsets = testing.seq_offsets


def make_inputs(lens, chunk, dtype, device, *, heads=4, headdim=8, dstate=16, groups=2, z=False, D=False,
                dt_bias=False, softplus=False, limit=False, init=False, strided=False, index_dtype=torch.int32):
    L, S = sum(lens), len(lens)
    param = F64 if dtype == F64 else F32
    inp = {
        "x": testing.make_tensor((1, L, heads, headdim), dtype, device, strided=strided),
        "dt": testing.make_tensor((1, L, heads), dtype, device, strided=strided,
                                  low=-4.0 if softplus else 0.005, high=-1.0 if softplus else 0.15),
        "A": -testing.make_tensor((heads,), param, device, low=0.2, high=2.0),
        "B": testing.make_tensor((1, L, groups, dstate), dtype, device, strided=strided, scale=dstate**-0.5),
        "C": testing.make_tensor((1, L, groups, dstate), dtype, device, strided=strided),
        "chunk_size": chunk,
        "dt_softplus": softplus,
        "cu_seqlens": offsets(lens, device, index_dtype),
    }
    if D:
        inp["D"] = testing.make_tensor((heads, headdim), param, device)
    if z:
        inp["z"] = testing.make_tensor((1, L, heads, headdim), dtype, device, strided=strided)
    if dt_bias:
        inp["dt_bias"] = testing.make_tensor((heads,), param, device, low=-0.3, high=0.3) * (1.0 if softplus else 0.1)
    if limit:
        inp["dt_limit"] = (0.05, 0.2) if softplus else (0.03, 0.12)
    if init:
        inp["initial_states"] = testing.make_tensor((S, heads, headdim, dstate), param, device)
    return inp


def reference_packed(cu_seqlens, initial_states=None, **kw):
    """The float64 reference on each sequence alone: (out [1, L, H, P], final [S, H, P, N])."""
    off = cu_seqlens.tolist()
    x = kw["x"]
    heads, headdim, dstate = x.shape[2], x.shape[3], kw["B"].shape[3]
    outs, finals = [], []
    for s in range(len(off) - 1):
        a, b = off[s], off[s + 1]
        init = None if initial_states is None else initial_states[s:s + 1]
        if a == b:
            outs.append(x.new_zeros((1, 0, heads, headdim), dtype=F64))
            finals.append(init[0].to(F64) if init is not None
                          else torch.zeros(heads, headdim, dstate, dtype=F64, device=x.device))
            continue
        piece = {k: (v[:, a:b] if k in ("x", "dt", "B", "C", "z") else v) for k, v in kw.items()}
        y, h = reference.ssd_scan(**piece, initial_states=init, return_final_states=True)
        outs.append(y)
        finals.append(h[0])
    return torch.cat(outs, 1), torch.stack(finals)


def ours(**kw):
    return ssm_kernels.ssd_scan(**kw)


def ref(return_final_states, **kw):
    return reference_packed(**kw)


def compare(inp, dtype):
    ours_in, out, final = run(ours, inp)
    ref_in, ref_out, ref_final = run(ref, inp, wide=F64)
    assert out.dtype == dtype and final.shape == ref_final.shape
    testing.assert_close(out, ref_out, dtype, "out")
    testing.assert_close(final, ref_final, dtype, "final_states")
    g_out = torch.randn_like(ref_out).to(out.dtype).to(F64)
    g_final = torch.randn_like(ref_final).to(final.dtype).to(F64)
    names = [k for k in NAMES if k in inp]
    got = testing.grads([out, final], [ours_in[k] for k in names], [g_out.to(out.dtype), g_final.to(final.dtype)])
    want = testing.grads([ref_out, ref_final], [ref_in[k] for k in names], [g_out, g_final])
    for name, a, e in zip(names, got, want):
        assert a is not None and a.shape == inp[name].shape and a.dtype == inp[name].dtype, name
        testing.assert_close(a, e, dtype, f"grad {name}")


# lengths: empty, 1, a chunk exactly, across a chunk boundary, several chunks, an empty one last
CASES = [
    ([5, 0, 16, 17, 1, 40, 0], 16, F32, dict(z=True, D=True, dt_bias=True, softplus=True, init=True)),
    ([33, 1, 0, 16, 70], 16, F16, dict(init=True, limit=True)),
    ([0, 64, 3, 31], 32, BF16, dict(z=True, D=True, softplus=True, dt_bias=True, init=True)),
    ([20, 9, 48], 16, F64, dict(z=True, D=True, init=True, softplus=True, limit=True)),
    ([100], 64, F32, dict(D=True)),
    ([7, 7, 7, 7, 7, 7], 16, F32, dict(z=True)),
]


@pytest.mark.parametrize("lens,chunk,dtype,opts", CASES,
                         ids=[f"{'-'.join(map(str, c[0]))}-Q{c[1]}-{testing.dtype_id(c[2])}" for c in CASES])
def test_varlen_ssd_matches_each_sequence_alone(lens, chunk, dtype, opts, device):
    compare(make_inputs(lens, chunk, dtype, device, **opts), dtype)


def test_varlen_ssd_int64_offsets_and_groups_per_head(device):
    inp = make_inputs([3, 20, 0, 9], 16, F32, device, groups=4, init=True, index_dtype=torch.int64)
    compare(inp, F32)


def test_varlen_ssd_strided_inputs(device):
    inp = make_inputs([30, 0, 11, 40], 16, F32, device, z=True, D=True, init=True, strided=True)
    assert not inp["x"].is_contiguous()
    testing.assert_runs_equal(run(ours, inp), run(ours, testing.contiguous_copies(inp)), [k for k in NAMES if k in inp])


def test_varlen_ssd_no_leakage(device):
    """Changing one sequence leaves every other sequence's outputs, final states and gradients
    bitwise unchanged."""
    lens = [20, 37, 5, 30]
    inp = make_inputs(lens, 16, F32, device, z=True, D=True, dt_bias=True, softplus=True, init=True)
    names = ["x", "dt", "B", "C", "z", "initial_states"]
    l1, out1, fin1 = run(ours, inp)
    g_out, g_fin = torch.randn_like(out1), torch.randn_like(fin1)
    g1 = testing.grads([out1, fin1], [l1[k] for k in names], [g_out, g_fin])
    a, b = 20, 57  # the second sequence
    other = dict(inp)
    for name in ("x", "dt", "B", "C", "z"):
        other[name] = inp[name].clone()
        other[name][:, a:b] *= 1.5
    other["initial_states"] = inp["initial_states"].clone()
    other["initial_states"][1] += 1.0
    l2, out2, fin2 = run(ours, other)
    g2 = testing.grads([out2, fin2], [l2[k] for k in names], [g_out, g_fin])
    keep = torch.ones(sum(lens), dtype=torch.bool, device=device)
    keep[a:b] = False
    assert torch.equal(out1[:, keep], out2[:, keep])
    assert not torch.equal(out1[:, ~keep], out2[:, ~keep])
    assert torch.equal(fin1[[0, 2, 3]], fin2[[0, 2, 3]])
    for name, t1, t2 in zip(names, g1, g2):
        if name == "initial_states":
            assert torch.equal(t1[[0, 2, 3]], t2[[0, 2, 3]]), name
        else:
            assert torch.equal(t1[:, keep], t2[:, keep]), name


def test_varlen_ssd_gradients_reproducible(device):
    inp = make_inputs([20, 0, 37, 5], 16, F32, device, z=True, D=True, dt_bias=True, softplus=True, init=True)
    names = [k for k in NAMES if k in inp]
    runs = []
    for _ in range(2):
        leaves, out, final = run(ours, inp)
        runs.append(testing.grads([out, final], [leaves[k] for k in names],
                                  [torch.ones_like(out), torch.ones_like(final)]))
    for name, a, b in zip(names, *runs):
        assert torch.equal(a, b), name


def _op_args(inp):
    lo, hi = inp.get("dt_limit", (0.0, math.inf))
    return (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["chunk_size"], inp.get("D"), inp.get("z"),
            inp.get("dt_bias"), inp["dt_softplus"], [lo, hi], inp.get("initial_states"), None)


def test_varlen_ssd_opcheck(device):
    inp = make_inputs([9, 0, 20, 3], 16, F32, device, heads=2, headdim=4, dstate=4, z=True, D=True,
                      dt_bias=True, softplus=True, init=True)
    args = testing.clone_float_args(_op_args(inp))
    testing.run_opcheck(torch.ops.ssm_kernels.ssd_scan_fwd.default, args + (inp["cu_seqlens"],))
    dout = torch.randn_like(inp["x"])
    dfinal = torch.randn(4, 2, 4, 4, device=device)
    testing.run_opcheck(torch.ops.ssm_kernels.ssd_scan_bwd.default, _op_args(inp) + (dout, dfinal, inp["cu_seqlens"]))


def test_varlen_ssd_compile_no_recompile_on_new_lengths(device):
    torch._dynamo.reset()
    inp = make_inputs([9, 30, 0, 25], 16, F32, device, z=True, init=True)

    def fn(x, dt, A, B, C, z, initial_states, cu_seqlens):
        return ssm_kernels.ssd_scan(x, dt, A, B, C, chunk_size=16, z=z, initial_states=initial_states,
                                    cu_seqlens=cu_seqlens, return_final_states=True)

    args = [inp[k] for k in ("x", "dt", "A", "B", "C", "z", "initial_states", "cu_seqlens")]
    testing.check_compile_over_lengths(fn, args, [offsets(lens, device) for lens in ([30, 9, 25, 0], [1, 1, 1, 61])])


def test_varlen_ssd_bad_inputs(device):
    inp = make_inputs([10, 0, 30], 16, F32, device, init=True)
    base = {k: inp[k] for k in ("x", "dt", "A", "B", "C", "cu_seqlens")}

    def bad(exc, name, **over):
        testing.assert_raises_naming(exc, name, ssm_kernels.ssd_scan, **{**base, **over})

    cu = inp["cu_seqlens"]
    two = {k: torch.cat([base[k], base[k]]) for k in ("x", "dt", "B", "C")}
    testing.assert_rejects_bad_cu_seqlens(lambda **over: ssm_kernels.ssd_scan(**{**base, **over}), cu, two)
    bad(ValueError, "cu_seqlens", cu_seqlens=cu[:1])
    bad(ValueError, "initial_states", initial_states=inp["initial_states"][:2])
    bad(ValueError, "initial_states", initial_states=torch.zeros(1, 4, 8, 16, device=device))
    leaves, out, final = run(ours, {**base, "initial_states": inp["initial_states"], "chunk_size": 16})
    assert final.shape == (3, 4, 8, 16)
    with pytest.raises(ValueError, match="dfinal_states"):
        torch.ops.ssm_kernels.ssd_scan_bwd(
            *_op_args({**inp, "initial_states": None}), torch.ones_like(inp["x"]), torch.zeros(2, 4, 8, 16, device=device),
            inp["cu_seqlens"])


def _same_grads(inp_a, inp_b, names):
    run_a = run(ours, inp_a)
    testing.assert_runs_equal(run_a, run(ours, inp_b), names, [torch.randn_like(o) for o in run_a[1:]])


@pytest.mark.parametrize("L", [1, 16, 17, 50])
def test_varlen_ssd_one_sequence_is_the_unpacked_scan(L, device):
    """One packed sequence runs the chunks of the unpacked row: bitwise the same results."""
    inp = make_inputs([L], 16, F32, device, z=True, D=True, dt_bias=True, softplus=True, init=True)
    unpacked = {k: v for k, v in inp.items() if k != "cu_seqlens"}
    _same_grads(inp, unpacked, [k for k in NAMES if k in inp])


def test_varlen_ssd_runs_of_empty_sequences(device):
    """Adjacent empty sequences, first and last: each keeps its own initial state as final state
    and gets its final state's gradient as initial state's gradient."""
    inp = make_inputs([0, 0, 16, 0, 0, 17, 1, 0, 0], 16, F32, device, z=True, D=True, init=True)
    compare(inp, F32)


def test_varlen_ssd_fused_projection_views(device):
    """x, z, B, C and dt as slices of one projection output (Mamba-2's in_proj split): rows
    strided along the sequence, read in place; bitwise the results of contiguous copies."""
    lens, heads, headdim, dstate = [21, 0, 16, 40], 4, 8, 16
    L = sum(lens)
    widths = [heads * headdim, heads * headdim, dstate, dstate, heads]
    proj = torch.randn(1, L, sum(widths), device=device)
    xs, zs, Bs, Cs, dts = proj.split(widths, dim=-1)
    Bs.mul_(dstate**-0.5)
    dts.uniform_(0.005, 0.15)
    inp = make_inputs(lens, 16, F32, device, heads=heads, headdim=headdim, dstate=dstate, groups=1, z=True, D=True,
                      init=True)
    inp.update(x=xs.unflatten(-1, (heads, headdim)), z=zs.unflatten(-1, (heads, headdim)), B=Bs.unsqueeze(2),
               C=Cs.unsqueeze(2), dt=dts)
    assert not any(inp[k].is_contiguous() for k in ("x", "z", "B", "C", "dt"))
    _same_grads(inp, testing.contiguous_copies(inp), [k for k in NAMES if k in inp])
    compare(inp, F32)
