"""mamba3_scan on packed variable-length sequences (cu_seqlens) against the float64 reference run
on each sequence alone: outputs, per-sequence final states and every gradient (initial states
included), on both CPU kernel paths (the blocked kernels and the per-task kernels the GPU runs)."""
import contextlib
import math

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing
from test_mamba3 import STATE_NAMES, Case, angle_close, call, check_backward_without_saved, leaves, make_inputs

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
PER_TOKEN_AXIS = {"q": 1, "k": 1, "v": 1, "z": 1, "angles": 1, "adt": 2, "dt": 2, "trap": 2}


offsets = testing.seq_offsets


def make_packed(lens, chunk, dtype, device, *, init=True, strided=False, index_dtype=torch.int32, **opts):
    """make_inputs of one row of sum(lens) tokens, with initial states per sequence and cu_seqlens."""
    case = Case(sum(lens), chunk, dtype, batch=1, init=False, **opts)
    inp = make_inputs(case, device, strided=strided)
    S, h, n, p, r = len(lens), case.nheads, case.dqk, case.dv, case.rank
    acc = F64 if dtype == F64 else F32
    a = inp["angles"].shape[-1] if "angles" in inp else 0
    if init:
        inp["initial_angle"] = testing.make_tensor((S, h, a), acc, device, low=0.0, high=2 * math.pi)
        inp["initial_ssm"] = testing.make_tensor((S, h, p, n), acc, device, scale=0.5)
        inp["initial_k"] = testing.make_tensor((S, h, r, n) if r else (S, h, n), acc, device)
        inp["initial_v"] = testing.make_tensor((S, h, r, p) if r else (S, h, p), acc, device)
    inp["cu_seqlens"] = offsets(lens, device, index_dtype)
    return inp


def kernels(path):
    """path "tasks" / "tasks-reversed": the CPU runs mamba3_task.h's stages (the GPU's code), each
    stage's items in order / in reverse; else the device's own kernels."""
    if not path.startswith("tasks"):
        return contextlib.nullcontext()
    return testing.mamba3_gpu_code_on_cpu(reversed_order=path == "tasks-reversed")


def paths(device):
    return ["blocked", "tasks", "tasks-reversed"] if device == "cpu" else ["device"]


def tensor_names(inp):
    return [k for k, v in inp.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def run(inp, g_out=None, g_final=None):
    """Ours on inp: (out, final states, gradients of every floating input by name)."""
    ours_in = leaves(inp)
    out, final = call(ssm_kernels.mamba3_scan, ours_in)
    g_out = torch.ones_like(out) if g_out is None else g_out
    g_final = [torch.ones_like(f) for f in final] if g_final is None else g_final
    names = tensor_names(inp)
    got = testing.grads([out, *final], [ours_in[k] for k in names], [g_out, *g_final])
    return out, final, dict(zip(names, got))


def compare(inp, dtype):
    ours_in = leaves(inp)
    ref_in = leaves(inp, F64)
    out, final = call(ssm_kernels.mamba3_scan, ours_in)
    ref_out, ref_final = call(reference.mamba3_scan, ref_in)
    S = inp["cu_seqlens"].shape[0] - 1
    assert out.dtype == dtype and out.shape == ref_out.shape
    testing.assert_close(out, ref_out, dtype, "out")
    angle_close(final[0], ref_final[0], dtype, "final angle")
    for name, a, e in zip(("ssm", "k", "v"), final[1:], ref_final[1:]):
        assert a.shape == e.shape and a.shape[0] == S, name
        testing.assert_close(a, e, dtype, f"final {name}")
    g_out = torch.randn_like(ref_out).to(out.dtype).to(F64)
    g_final = [torch.randn_like(e) for e in ref_final]
    names = tensor_names(inp)
    got = testing.grads([out, *final], [ours_in[k] for k in names],
                        [g_out.to(out.dtype)] + [g.to(a.dtype) for g, a in zip(g_final, final)])
    want = testing.grads([ref_out, *ref_final], [ref_in[k] for k in names], [g_out, *g_final])
    for name, a, e in zip(names, got, want):
        assert a is not None, f"no gradient for {name}"
        assert a.dtype == inp[name].dtype and a.shape == inp[name].shape, name
        testing.assert_close(a, e, dtype, f"grad {name}")


# lengths: empty (also first and last), 1, a chunk exactly, across chunk boundaries, more chunks
# than a block of the CPU kernels (32)
CASES = [
    ([5, 0, 16, 17, 1, 40, 0], 8, F32, dict(rank=0, rope="half", z=True, D=True, bias=True)),
    ([1, 33, 0, 9], 16, BF16, dict(rank=2, groups="H", rope="full", z=True, D=True, bias=True, dqk=8, dv=3)),
    ([0, 12, 3], 4, F16, dict(rank=0, rope="none", z=True, init=False)),
    ([7, 20, 2], 8, F64, dict(rank=2, rope="half", z=True, D=True, bias=True, dqk=8, dv=4)),
    ([70, 1, 0], 2, F32, dict(rank=0, groups="H", rope="half", D=True, bias=True, dqk=8, dv=3)),
    ([30], 64, F32, dict(rank=4, rope="half", z=True, D=True, bias=True, nheads=3, dqk=8, dv=3)),
    ([3, 0, 0, 25], 8, F32, dict(rank=1, rope="full", D=True, bias=True)),
]


def case_id(c):
    opts = c[3]
    kind = f"R{opts['rank']}" if opts.get("rank") else "siso"
    return f"{'-'.join(map(str, c[0]))}-Q{c[1]}-{testing.dtype_id(c[2])}-{kind}-rope-{opts.get('rope', 'half')}"


@pytest.mark.parametrize("lens,chunk,dtype,opts", CASES, ids=[case_id(c) for c in CASES])
def test_varlen_mamba3_matches_each_sequence_alone(lens, chunk, dtype, opts, device):
    inp = make_packed(lens, chunk, dtype, device, **opts)
    for path in paths(device):
        with kernels(path):
            compare(inp, dtype)


@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_varlen_mamba3_equals_the_op_per_sequence(rank, device):
    """The packed call against mamba3_scan called on each sequence alone (batch 1)."""
    lens = [9, 0, 21, 1, 12]
    inp = make_packed(lens, 8, F32, device, rank=rank, rope="half", z=True, D=True, bias=True, dqk=8, dv=4)
    g_out = torch.randn(1, sum(lens), *inp["v"].shape[2:], device=device)
    out, final, got = run(inp)
    g_final = [torch.randn_like(f) for f in final]
    out, final, got = run(inp, g_out, g_final)
    off = offsets(lens, "cpu").tolist()
    for s in range(len(lens)):
        a, b = off[s], off[s + 1]
        if a == b:
            for name, f in zip(STATE_NAMES, final):
                assert torch.equal(f[s], inp[name][s]), f"empty sequence {s}: final {name}"
                assert torch.equal(got[name][s], g_final[STATE_NAMES.index(name)][s]), f"d{name}"
            continue
        piece = {k: v for k, v in inp.items() if k != "cu_seqlens"}
        for k, axis in PER_TOKEN_AXIS.items():
            if k in piece:
                piece[k] = piece[k].narrow(axis, a, b - a)
        for k in STATE_NAMES:
            piece[k] = inp[k][s:s + 1]
        o, f, g = run(piece, g_out[:, a:b], [t[s:s + 1] for t in g_final])
        testing.assert_close(out[:, a:b], o.double(), F32, f"out of sequence {s}")
        for name, x, y in zip(STATE_NAMES, final, f):
            testing.assert_close(x[s:s + 1], y.double(), F32, f"final {name} of sequence {s}")
        for k, axis in PER_TOKEN_AXIS.items():
            if k in g:
                testing.assert_close(got[k].narrow(axis, a, b - a), g[k].double(), F32, f"grad {k} of sequence {s}")
        for k in STATE_NAMES:
            testing.assert_close(got[k][s:s + 1], g[k].double(), F32, f"grad {k} of sequence {s}")


def test_varlen_mamba3_int64_offsets(device):
    inp = make_packed([4, 11, 0, 6], 4, F32, device, index_dtype=torch.int64, rank=0, rope="half", z=True, D=True)
    compare(inp, F32)


@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_varlen_mamba3_strided_inputs(rank, device):
    inp = make_packed([13, 0, 22, 5], 8, F32, device, strided=True, rank=rank, rope="half", z=True, D=True,
                      bias=True, dqk=8, dv=4)
    assert not inp["v"].is_contiguous() and not inp["q"].is_contiguous()
    contig = testing.contiguous_copies(inp)
    for path in paths(device):
        with kernels(path):
            out1, fin1, g1 = run(inp)
            out2, fin2, g2 = run(contig)
        assert torch.equal(out1, out2), path
        assert all(torch.equal(a, b) for a, b in zip(fin1, fin2)), path
        for name in g1:
            assert torch.equal(g1[name], g2[name]), f"{path}: grad {name}"


@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_varlen_mamba3_no_leakage(rank, device):
    """Changing one sequence (its tokens and its initial states) leaves every other sequence's
    outputs, final states and gradients bitwise unchanged: in particular the trapezoid's
    previous-token term does not reach across a boundary, either way."""
    lens = [12, 19, 5, 14]
    inp = make_packed(lens, 8, F32, device, rank=rank, rope="half", z=True, D=True, bias=True, dqk=8, dv=4)
    a, b = 12, 31  # the second sequence
    other = dict(inp)
    for name, axis in PER_TOKEN_AXIS.items():
        if name in inp:
            t = inp[name].clone()
            t.narrow(axis, a, b - a).mul_(1.5)
            other[name] = t
    for name in STATE_NAMES:
        other[name] = inp[name].clone()
        other[name][1] += 0.5
    keep = torch.ones(sum(lens), dtype=torch.bool, device=device)
    keep[a:b] = False
    rows = [0, 2, 3]
    for path in paths(device):
        with kernels(path):
            out1, fin1, g1 = run(inp)
            g_out = torch.randn_like(out1)
            g_fin = [torch.randn_like(f) for f in fin1]
            out1, fin1, g1 = run(inp, g_out, g_fin)
            out2, fin2, g2 = run(other, g_out, g_fin)
        assert torch.equal(out1[:, keep], out2[:, keep]), path
        assert not torch.equal(out1[:, ~keep], out2[:, ~keep]), path
        for f1, f2 in zip(fin1, fin2):
            assert torch.equal(f1[rows], f2[rows]), path
        for name, axis in PER_TOKEN_AXIS.items():
            if name in g1:
                assert torch.equal(g1[name].index_select(axis, keep.nonzero()[:, 0]),
                                   g2[name].index_select(axis, keep.nonzero()[:, 0])), f"{path}: grad {name}"
        for name in STATE_NAMES:
            assert torch.equal(g1[name][rows], g2[name][rows]), f"{path}: grad {name}"


def test_varlen_mamba3_gradients_reproducible(device):
    inp = make_packed([20, 0, 37, 5], 8, F32, device, rank=2, rope="half", z=True, D=True, bias=True, dqk=8, dv=4)

    def once():
        out, final, g = run(inp)
        return [out, *final, *g.values()]

    for path in paths(device):
        with kernels(path):
            testing.assert_deterministic(once)


def test_varlen_mamba3_gradcheck():
    inp = make_packed([3, 0, 4], 2, F64, "cpu", rank=2, rope="half", z=True, D=True, bias=True, nheads=1, dqk=4,
                      dv=2)
    names = tensor_names(inp)
    tensors = [inp[n].detach().requires_grad_(True) for n in names]

    def fn(*ts):
        kw = {**inp, **dict(zip(names, ts))}
        out, final = call(ssm_kernels.mamba3_scan, kw)
        return (out, *final)

    for path in ("blocked", "tasks"):
        with kernels(path):
            testing.check_gradcheck(fn, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def _op_kwargs(op, values):
    return {a.name: values.get(a.name) for a in op._schema.arguments}


@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_varlen_mamba3_opcheck(rank, device):
    inp = make_packed([5, 0, 7, 2], 4, F32, device, rank=rank, rope="half", z=True, D=True, bias=True, nheads=2,
                      dqk=4, dv=3)
    fwd = torch.ops.ssm_kernels.mamba3_scan_fwd.default
    kw = _op_kwargs(fwd, {**inp, "save_for_backward": True})
    for v in kw.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v.requires_grad_(True)
    testing.run_opcheck(fwd, (), kw)
    out, fa, fs, fk, fv, _, _ = fwd(**{k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    assert fs.shape[0] == 4
    bwd = torch.ops.ssm_kernels.mamba3_scan_bwd.default
    values = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    values.update(dout=torch.randn_like(out), dfinal_angle=torch.randn_like(fa), dfinal_ssm=torch.randn_like(fs),
                  dfinal_k=torch.randn_like(fk), dfinal_v=torch.randn_like(fv))
    testing.run_opcheck(bwd, (), _op_kwargs(bwd, values))


@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_varlen_mamba3_backward_recomputes_saved(rank):
    inp = make_packed([5, 0, 70, 2, 33], 2, F32, "cpu", rank=rank, rope="half", z=True, D=True, bias=True,
                      nheads=2, dqk=8, dv=3)
    check_backward_without_saved(inp, F32)


def test_varlen_mamba3_compile_no_recompile_on_new_lengths(device):
    torch._dynamo.reset()
    inp = make_packed([9, 30, 0, 25], 8, F32, device, rank=2, rope="half", z=True, D=True, dqk=8, dv=4)

    def fn(q, k, v, adt, dt, trap, angles, z, mimo_v, mimo_z, mimo_o, initial_ssm, initial_k, cu_seqlens):
        out, states = ssm_kernels.mamba3_scan(q, k, v, adt, dt, trap, angles=angles, z=z, mimo_v=mimo_v,
                                              mimo_z=mimo_z, mimo_o=mimo_o,
                                              initial_states=(None, initial_ssm, initial_k, None), chunk_size=8,
                                              return_final_states=True, cu_seqlens=cu_seqlens)
        return (out, *states)

    names = ("q", "k", "v", "adt", "dt", "trap", "angles", "z", "mimo_v", "mimo_z", "mimo_o", "initial_ssm",
             "initial_k", "cu_seqlens")
    testing.check_compile_over_lengths(fn, [inp[n] for n in names],
                                       [offsets(lens, device) for lens in ([30, 9, 25, 0], [1, 1, 1, 61])])


def test_varlen_mamba3_bad_inputs(device):
    inp = make_packed([10, 0, 30], 8, F32, device, rank=0, rope="half", z=True, D=True)
    base = {k: v for k, v in inp.items() if k not in STATE_NAMES}

    def scan(**over):
        kw = {**base, **over}
        return ssm_kernels.mamba3_scan(**kw)

    cu = inp["cu_seqlens"]
    two = {k: torch.cat([base[k], base[k]]) for k in ("q", "k", "v", "adt", "dt", "trap", "angles", "z")}
    testing.assert_rejects_bad_cu_seqlens(scan, cu, two, takes_seq_idx=False)
    testing.assert_raises_naming(ValueError, "cu_seqlens", scan, cu_seqlens=cu[:1])
    testing.assert_raises_naming(ValueError, "cu_seqlens", scan, cu_seqlens=cu[None])
    states = tuple(inp[n] for n in STATE_NAMES)
    for i, name in enumerate(STATE_NAMES):
        for rows in (2, 1):
            wrong = tuple(s[:rows] if j == i else s for j, s in enumerate(states))
            testing.assert_raises_naming(ValueError, name, scan, initial_states=wrong)
    out, final = scan(initial_states=states, return_final_states=True)
    assert [f.shape[0] for f in final] == [3, 3, 3, 3]
    bwd = torch.ops.ssm_kernels.mamba3_scan_bwd.default
    values = {k: v for k, v in base.items()}
    values.update(dout=torch.ones_like(out), dfinal_ssm=torch.zeros_like(final[1][:2]))
    testing.assert_raises_naming(ValueError, "dfinal_ssm", bwd, **_op_kwargs(bwd, values))


def test_varlen_mamba3_compat_mimo_packed():
    """compat.mamba3_mimo's cu_seqlens is mamba3_scan's: per-sequence states, empty sequences,
    and the per-rank outputs (MIMO_Out None) of a packed row."""
    from ssm_kernels.compat import mamba_ssm as compat

    lens = [6, 0, 11]
    inp = make_packed(lens, 4, F32, "cpu", init=False, rank=2, rope="half", z=True, D=True, bias=True, dqk=8, dv=4)
    want, want_final = call(ssm_kernels.mamba3_scan, inp)
    names = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "mimo_v", "mimo_z", "mimo_o", "angles", "D",
             "z")
    args = [inp[n] for n in names]
    got = compat.mamba3_mimo(*args, chunk_size=4, rotary_dim_divisor=4, dtype=F32, return_state=True,
                             cu_seqlens=inp["cu_seqlens"])
    assert torch.equal(got[0], want)
    for a, e in zip(got[1:], want_final):
        assert a.shape[0] == len(lens) and torch.equal(a, e)
    args[10] = None
    per_rank = compat.mamba3_mimo(*args, chunk_size=4, rotary_dim_divisor=4, dtype=F32, cu_seqlens=inp["cu_seqlens"])
    assert per_rank.shape == (1, sum(lens), 2, 2, 4)
    testing.assert_close((per_rank * inp["mimo_o"].transpose(0, 1)).sum(2), want.double(), F32, "per-rank outputs")
