"""mamba3_scan / mamba3_step (Mamba-3 SISO and MIMO) against the float64 reference, forward and
every gradient; the reference against the chunked (quadratic) form and, where its source is at
hand, against mamba_ssm's own reference."""
import ast
import math
import os
from dataclasses import dataclass

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing
from ssm_kernels.testing import (
    assert_close,
    assert_raises_naming,
    check_compile,
    check_gradcheck,
    dtype_id,
    grads,
    make_tensor,
    run_opcheck,
)

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
STATE_NAMES = ("initial_angle", "initial_ssm", "initial_k", "initial_v")


@dataclass
class Case:
    seqlen: int
    chunk: int
    dtype: torch.dtype
    rank: int = 0  # 0: SISO; else the MIMO rank
    groups: str = "1"  # "1" or "H"
    rope: str = "half"  # "half", "full" or "none"
    z: bool = False
    D: bool = False
    bias: bool = False
    init: bool = False
    batch: int = 2
    nheads: int = 2
    dqk: int = 6
    dv: int = 5

    def id(self):
        opts = [f"R{self.rank}" if self.rank else "siso", f"g{self.groups}", f"rope-{self.rope}"]
        opts += [n for n in ("z", "D", "bias", "init") if getattr(self, n)]
        return f"L{self.seqlen}-Q{self.chunk}-N{self.dqk}-P{self.dv}-{dtype_id(self.dtype)}-" + "-".join(opts)


CASES = [
    Case(1, 16, F32, D=True, init=True, z=True, bias=True),
    Case(1, 4, BF16, rank=2, groups="H", init=True, z=True),
    Case(17, 8, F32, rank=0, groups="H", rope="full", z=True, D=True, bias=True, init=True),
    Case(16, 16, F16, rank=0, rope="half", z=True, bias=True),
    Case(33, 16, F32, rank=1, rope="half", D=True, init=True, bias=True),
    Case(31, 8, F32, rank=2, groups="H", rope="full", z=True, D=True, bias=True, init=True, dqk=8, dv=3),
    Case(40, 16, F32, rank=4, groups="1", rope="half", z=True, D=True, bias=True, init=True, nheads=3, dqk=8),
    Case(23, 8, BF16, rank=0, rope="none", z=True, D=True, init=True, batch=1),
    Case(29, 8, F16, rank=4, rope="full", z=True, D=True, bias=True, init=True, batch=1, dqk=4),
    Case(70, 64, F32, rank=0, groups="H", rope="half", z=True, D=True, bias=True, init=True, nheads=3,
         dqk=10, dv=7),
    Case(9, 1, F64, rank=2, rope="full", z=True, D=True, bias=True, init=True, batch=1),
    # more chunks than the CPU kernels' block of 32: several blocks, reloaded by the backward
    Case(67, 2, F32, rank=0, rope="half", z=True, D=True, bias=True, init=True, batch=1, dqk=8, dv=3),
    Case(69, 2, F32, rank=2, groups="H", rope="full", z=True, D=True, bias=True, init=True, batch=1, nheads=3,
         dqk=4, dv=3),
    # a rank that does not divide the GPU's 16-row tiles: a step's rows straddle a tile boundary
    Case(50, 8, F32, rank=3, groups="H", rope="full", z=True, D=True, bias=True, init=True, nheads=3, dqk=10, dv=7),
    # chunks of Q R = 256 rows: blocks of 4 chunks
    Case(260, 64, F32, rank=4, rope="half", z=True, D=True, bias=True, init=True, batch=1, dqk=8, dv=3),
]


def make_inputs(case: Case, device="cpu", strided=False):
    b, l, h, n, p = case.batch, case.seqlen, case.nheads, case.dqk, case.dv
    g = 1 if case.groups == "1" else h
    r = case.rank
    d = case.dtype
    F32 = F64 if d == F64 else torch.float32  # the small inputs: float32, or float64 throughout
    a = {"half": n // 4, "full": n // 2, "none": 0}[case.rope]
    qshape = (b, l, r, g, n) if r else (b, l, g, n)
    dt = make_tensor((b, h, l), F32, device, low=0.02, high=0.3)
    inp = {
        "q": make_tensor(qshape, d, device, strided=strided),
        "k": make_tensor(qshape, d, device, strided=strided, scale=n**-0.5),
        "v": make_tensor((b, l, h, p), d, device, strided=strided),
        "adt": (-dt * make_tensor((h, 1), F32, device, low=0.5, high=2.0)).detach(),
        "dt": dt,
        "trap": make_tensor((b, h, l), F32, device),
        "chunk_size": case.chunk,
    }
    if a:
        inp["angles"] = make_tensor((b, l, h, a), F32, device, scale=2.0)
    if case.bias:
        bshape = (h, r, n) if r else (h, n)
        inp["q_bias"] = make_tensor(bshape, F32, device, scale=0.5)
        inp["k_bias"] = make_tensor(bshape, F32, device, scale=0.5)
    if case.D:
        inp["D"] = make_tensor((h,), F32, device)
    if case.z:
        inp["z"] = make_tensor((b, l, h, p), d, device, strided=strided)
    if r:
        inp["mimo_v"] = make_tensor((h, r, p), F32, device)
        inp["mimo_o"] = make_tensor((h, r, p), F32, device, scale=1.0 / r)
        if case.z:
            inp["mimo_z"] = make_tensor((h, r, p), F32, device)
    if case.init:
        inp["initial_angle"] = make_tensor((b, h, a), F32, device, low=0.0, high=2 * math.pi)
        inp["initial_ssm"] = make_tensor((b, h, p, n), F32, device, scale=0.5)
        inp["initial_k"] = make_tensor((b, h, r, n) if r else (b, h, n), F32, device)
        inp["initial_v"] = make_tensor((b, h, r, p) if r else (b, h, p), F32, device)
    return inp


def call(fn, inp):
    kw = {k: v for k, v in inp.items() if k not in STATE_NAMES}
    states = tuple(inp.get(n) for n in STATE_NAMES)
    kw["initial_states"] = states if any(s is not None for s in states) else None
    return fn(**kw, return_final_states=True)


def leaves(inp, wide=None):
    out = {}
    for k, v in inp.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = (v.detach().to(wide) if wide else v.detach().clone()).requires_grad_(True)
        out[k] = v
    return out


def angle_close(actual, expected, dtype, name):
    """Angles compared modulo 2 pi (a wrap at 2 pi may differ between precisions)."""
    diff = torch.remainder(actual.double() - expected.double() + math.pi, 2 * math.pi) - math.pi
    assert_close(expected.double() + diff, expected.double(), dtype, name)


def test_mamba3_reference_matches_chunked_form():
    """The step-loop reference equals the quadratic form
    y_t = sum_{s<=t} [e^{Acs_t-Acs_s} gamma_s + e^{Acs_t-Acs_{s+1}} beta_{s+1} 1(s<t)] (q_t.k_s) v_s
    plus the decayed initial state, written directly (SISO, one group, no gate)."""
    case = Case(12, 4, F64, rope="full", bias=True, D=True, init=True, batch=1, nheads=1)
    inp = make_inputs(case)
    out, (fa, fs, fk, fv) = call(reference.mamba3_scan, inp)
    q = inp["q"][0, :, 0] + inp["q_bias"][0]
    k = inp["k"][0, :, 0] + inp["k_bias"][0]
    v = inp["v"][0, :, 0]
    adt, dt, lam = inp["adt"][0, 0].double(), inp["dt"][0, 0].double(), torch.sigmoid(inp["trap"][0, 0].double())
    theta = inp["initial_angle"][0, 0].double() + torch.cumsum(
        math.pi * torch.tanh(inp["angles"][0, :, 0].double()) * dt[:, None], 0)
    c, s = torch.cos(theta), torch.sin(theta)

    def rot(x):
        x0, x1 = x[:, 0::2], x[:, 1::2]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(1)

    q, k = rot(q.double()), rot(k.double())
    cum = torch.cumsum(adt, 0)
    L = case.seqlen
    alpha = torch.exp(adt)
    beta = (1 - lam) * dt * alpha
    gamma = lam * dt
    y = torch.zeros(L, case.dv, dtype=F64)
    for t in range(L):
        for s_ in range(t + 1):
            coef = torch.exp(cum[t] - cum[s_]) * gamma[s_]
            if s_ < t:
                coef = coef + torch.exp(cum[t] - cum[s_ + 1]) * beta[s_ + 1]
            y[t] += coef * (q[t] @ k[s_]) * v[s_]
    S0 = inp["initial_ssm"][0, 0].double() + beta[0] / alpha[0] * torch.outer(
        inp["initial_v"][0, 0].double(), inp["initial_k"][0, 0].double())
    y += torch.exp(cum)[:, None] * (q @ S0.T)
    y += inp["D"][0].double() * v.double()
    torch.testing.assert_close(out[0, :, 0], y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fk[0, 0], k[-1])
    torch.testing.assert_close(fv[0, 0], v[-1].double())
    torch.testing.assert_close(torch.cos(fa[0, 0]), c[-1])


def _repeat_last(x, pattern, e):
    """einops.repeat for the one pattern the references use on ungrouped heads."""
    assert pattern == "... d -> ... d e", pattern
    return x.unsqueeze(-1).expand(*x.shape, e)


def _rearrange_bias(x, pattern):
    """einops.rearrange for the one pattern the MIMO reference uses."""
    assert pattern == "h r d -> r h d", pattern
    return x.permute(1, 0, 2)


def _mamba_ssm_functions(relpath, wanted):
    """Functions of mamba_ssm's Mamba-3 tests, read from a source checkout named by MAMBA_SSM_SRC."""
    root = os.environ.get("MAMBA_SSM_SRC")
    path = os.path.join(root or "", relpath)
    if not root or not os.path.exists(path):
        pytest.skip("MAMBA_SSM_SRC (a mamba_ssm source checkout with Mamba-3) not set")
    tree = ast.parse(open(path).read())
    tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted]
    ns = {"torch": torch, "F": torch.nn.functional, "math": math, "repeat": _repeat_last,
          "rearrange": _rearrange_bias, "Optional": __import__("typing").Optional,
          "Tuple": __import__("typing").Tuple}
    exec(compile(tree, path, "exec"), ns)
    return [ns[w] for w in wanted]


def _mamba_ssm_refs():
    return _mamba_ssm_functions(os.path.join("tests", "ops", "triton", "test_mamba3_siso.py"),
                                ["mamba3_siso_step_ref", "mamba3_siso_fwd_ref", "_segsum"])[:2]


def test_mamba3_mimo_reference_matches_mamba_ssm():
    (step_ref,) = _mamba_ssm_functions(os.path.join("tests", "ops", "tilelang", "test_mamba3_mimo.py"),
                                       ["mamba3_MIMO_step_ref"])
    case = Case(7, 4, F64, rank=2, groups="H", rope="half", z=True, D=True, bias=True, init=True, nheads=2, dqk=8,
                dv=4)
    inp = make_inputs(case)
    ours, states = call(reference.mamba3_scan, inp)
    names = ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "mimo_v", "mimo_o", "D", "z",
             "mimo_z")
    init = tuple(inp[n] for n in STATE_NAMES)
    theirs, their_states = step_ref(*[inp[n] for n in names], Input_States=init)
    torch.testing.assert_close(ours, theirs)
    # their angle state is not reduced mod 2 pi
    torch.testing.assert_close(torch.cos(states[0]), torch.cos(their_states[0]))
    for a, b in zip(states[1:], their_states[1:]):
        torch.testing.assert_close(a, b)


def test_mamba3_reference_matches_mamba_ssm():
    step_ref, fwd_ref = _mamba_ssm_refs()
    case = Case(10, 4, F64, groups="H", rope="half", z=True, D=True, bias=True, init=True, nheads=2, dqk=8, dv=4)
    inp = make_inputs(case)
    ours, states = call(reference.mamba3_scan, inp)
    args = (inp["q"], inp["k"], inp["v"], inp["adt"].double(), inp["dt"].double(), inp["trap"].double(),
            inp["q_bias"].double(), inp["k_bias"].double(), inp["angles"].double(), inp["D"].double(),
            inp["z"])
    init = tuple(inp[n].double() for n in STATE_NAMES)
    theirs, their_states = step_ref(*args, Input_States=init)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(states, their_states):
        torch.testing.assert_close(a, b.double())
    # its chunked form casts adt and dt to float32
    theirs_fwd, _ = fwd_ref(*args, Initial_States=init, dtype=F64)
    torch.testing.assert_close(ours, theirs_fwd.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_mamba3_forward_backward(case, device):
    inp = make_inputs(case, device)
    ours_in = leaves(inp)
    ref_in = leaves(inp, F64)
    out, final = call(ssm_kernels.mamba3_scan, ours_in)
    ref_out, ref_final = call(reference.mamba3_scan, ref_in)
    assert out.dtype == case.dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, case.dtype, "out")
    angle_close(final[0], ref_final[0], case.dtype, "final angle")
    for name, a, e in zip(("ssm", "k", "v"), final[1:], ref_final[1:]):
        assert a.dtype == (F64 if case.dtype == F64 else F32) and a.shape == e.shape, name
        assert_close(a, e, case.dtype, f"final {name}")

    g_out = torch.randn_like(ref_out).to(out.dtype).to(F64)
    g_final = [torch.randn_like(e) for e in ref_final]
    names = [k for k, v in inp.items() if isinstance(v, torch.Tensor)]
    got = grads([out, *final], [ours_in[k] for k in names],
                [g_out.to(out.dtype)] + [g.to(a.dtype) for g, a in zip(g_final, final)])
    want = grads([ref_out, *ref_final], [ref_in[k] for k in names], [g_out, *g_final])
    for name, a, e in zip(names, got, want):
        assert a is not None, f"no gradient for {name}"
        assert a.dtype == inp[name].dtype and a.shape == inp[name].shape, name
        assert_close(a, e, case.dtype, f"grad {name}")


@pytest.mark.parametrize("order", ["in_order", "reversed"])
@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_mamba3_task_kernels_cpu(case, order):
    """The CPU running mamba3_task.h's stages (the GPU's code) instead of its blocked kernels, each
    stage's items in order and in reverse."""
    with testing.mamba3_gpu_code_on_cpu(reversed_order=order == "reversed"):
        test_mamba3_forward_backward(case, "cpu")


def check_backward_without_saved(inp, dtype):
    """The backward op given the forward's chunk states and gate input (as autograd gives them on
    the CPU) against it recomputing them from the inputs (a direct call, or CUDA's forward)."""
    fwd, bwd = torch.ops.ssm_kernels.mamba3_scan_fwd.default, torch.ops.ssm_kernels.mamba3_scan_bwd.default
    values = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in inp.items()}
    values["save_for_backward"] = True
    outs = fwd(**{a.name: values.get(a.name) for a in fwd._schema.arguments})
    names = [r.name for r in fwd._schema.returns]
    values.update(zip(names, outs))
    assert values["chunk_states"].numel() > 0 and values["gate_input"].numel() > 0
    for n, o in zip(names[:5], outs[:5]):
        values["d" + n] = torch.randn_like(o)
    kw = {a.name: values.get(a.name) for a in bwd._schema.arguments}
    saved = bwd(**kw)
    recomputed = bwd(**{**kw, "chunk_states": None, "gate_input": None})
    for r, a, e in zip(bwd._schema.returns, recomputed, saved):
        assert_close(a, e.double(), dtype, r.name)


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_mamba3_backward_recomputes_saved(case):
    check_backward_without_saved(make_inputs(case, "cpu", strided=True), case.dtype)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=dtype_id)
@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_mamba3_reduced_dtypes_widen_on_cpu(rank, dtype):
    """Half and bfloat16 scans on the CPU run the float32 kernels on float32 copies of q, k, v, z
    and dout (rounded to the input dtype first), rounding out, dv and dz once: bitwise the float32
    op on the same values, forward and backward."""
    fwd, bwd = torch.ops.ssm_kernels.mamba3_scan_fwd.default, torch.ops.ssm_kernels.mamba3_scan_bwd.default
    case = Case(37, 8, dtype, rank=rank, rope="half", z=True, D=True, bias=True, init=True, dqk=8, dv=6)
    reduced = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in make_inputs(case, "cpu").items()}
    reduced["save_for_backward"] = True
    widened = {k: (v.float() if k in ("q", "k", "v", "z") else v) for k, v in reduced.items()}
    results = []
    for values in (reduced, widened):
        outs = fwd(**{a.name: values.get(a.name) for a in fwd._schema.arguments})
        kw = {a.name: values.get(a.name) for a in bwd._schema.arguments}
        kw.update(zip([r.name for r in fwd._schema.returns][5:], outs[5:]))
        # A float32 dout: the reduced op rounds it to its dtype first, as its own kernels would.
        dout = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(0))
        kw["dout"] = dout if values is reduced else dout.to(dtype).float()
        results.append((outs, bwd(**kw)))
    (outs_r, grads_r), (outs_w, grads_w) = results
    assert outs_r[0].dtype == dtype and torch.equal(outs_r[0], outs_w[0].to(dtype))
    for r, a, e in zip(fwd._schema.returns[1:], outs_r[1:], outs_w[1:]):
        assert torch.equal(a, e), r.name
    for r, a, e in zip(bwd._schema.returns, grads_r, grads_w):
        assert a.shape == e.shape and torch.equal(a, e.to(a.dtype)), r.name


@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
def test_mamba3_chunk_size_and_strides(dtype, device):
    case = Case(37, 8, dtype, rank=2, rope="half", z=True, D=True, bias=True, init=True, dqk=8, dv=6)
    base = make_inputs(case, device)
    strided = dict(base)
    other = make_inputs(case, device, strided=True)
    for k in ("q", "k", "v", "z"):
        strided[k] = other[k].copy_(base[k])
        assert not strided[k].is_contiguous()
    out1, _ = call(ssm_kernels.mamba3_scan, base)
    out2, _ = call(ssm_kernels.mamba3_scan, {**strided, "chunk_size": 5})
    assert_close(out2, out1.double(), dtype, "chunk 5 strided vs chunk 8")


@pytest.mark.parametrize("rope", ["half", "full"])
@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_mamba3_step_equals_scan(rank, rope, device):
    case = Case(9, 4, F32, rank=rank, rope=rope, z=True, D=True, bias=True, init=True, nheads=4, dqk=8, dv=6,
                batch=3)
    inp = make_inputs(case, device)
    out, final = call(ssm_kernels.mamba3_scan, inp)
    # the states live at rows 2, 0, 4 of a larger cache; row 1 and 3 must stay untouched
    idx = torch.tensor([2, 0, 4], device=device)
    states = []
    for name in STATE_NAMES:
        t = inp[name]
        cache = torch.full((5, *t.shape[1:]), 7.0, dtype=F32, device=device)
        cache[idx] = t
        states.append(cache)
    per_step = {k: inp.get(k) for k in ("q_bias", "k_bias", "D", "mimo_v", "mimo_z", "mimo_o")}
    for t in range(case.seqlen):
        o = ssm_kernels.mamba3_step(
            *states, inp["q"][:, t], inp["k"][:, t], inp["v"][:, t], inp["adt"][:, :, t], inp["dt"][:, :, t],
            inp["trap"][:, :, t], angles=inp["angles"][:, t], z=inp["z"][:, t], state_batch_indices=idx,
            **{k: v for k, v in per_step.items() if v is not None},
        )
        assert_close(o, out[:, t], F32, f"step {t}")
    angle_close(states[0][idx], final[0], F32, "angle state")
    for name, s, f in zip(STATE_NAMES[1:], states[1:], final[1:]):
        assert_close(s[idx], f, F32, name)
        assert (s[[1, 3]] == 7.0).all(), f"{name}: an unindexed row changed"


@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_mamba3_step_task_kernels_cpu(rank):
    """The decode step with its phases split as the GPU's block splits them (emulated lanes)."""
    with testing.mamba3_gpu_code_on_cpu():
        test_mamba3_step_equals_scan(rank, "full", "cpu")


def test_mamba3_step_negative_index_writes_zeros():
    case = Case(1, 1, F32, rope="half", init=True, nheads=2, dqk=4, dv=3, batch=2)
    inp = make_inputs(case)
    states = [inp[n].clone() for n in STATE_NAMES]
    before = [s.clone() for s in states]
    o = ssm_kernels.mamba3_step(*states, inp["q"][:, 0], inp["k"][:, 0], inp["v"][:, 0], inp["adt"][..., 0],
                                inp["dt"][..., 0], inp["trap"][..., 0], angles=inp["angles"][:, 0],
                                state_batch_indices=torch.tensor([-1, 1]))
    assert (o[0] == 0).all()
    for s, b in zip(states, before):
        assert torch.equal(s[0], b[0])
        assert not torch.equal(s[1], b[1])


def _small(rank=0, device="cpu", dtype=F32):
    case = Case(6, 4, dtype, rank=rank, rope="half", z=True, D=True, bias=True, init=True, batch=1, dqk=4, dv=3)
    return make_inputs(case, device)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("rank", [0, 2], ids=["siso", "mimo2"])
def test_mamba3_opcheck(rank, dtype, device):
    inp = _small(rank, device, dtype)
    names = [a.name for a in torch.ops.ssm_kernels.mamba3_scan_fwd.default._schema.arguments]
    kw = {k: inp.get(k) for k in names}
    for k, v in kw.items():
        if isinstance(v, torch.Tensor):
            v.requires_grad_(True)
    for save in (True, False):
        run_opcheck(torch.ops.ssm_kernels.mamba3_scan_fwd.default, (), {**kw, "save_for_backward": save})
    step = {k: inp[k][:, 0] for k in ("q", "k", "v", "z")}
    step.update({k: inp[k][..., 0].detach() for k in ("adt", "dt", "trap")})
    step["angles"] = inp["angles"][:, 0].detach()
    step.update({k: (inp[k].detach() if k in inp else None)
                 for k in ("q_bias", "k_bias", "D", "mimo_v", "mimo_z", "mimo_o")})
    states = {n.replace("initial_", "") + "_state": inp[n].detach().clone() for n in STATE_NAMES}
    step = {k: None if v is None else v.detach() for k, v in step.items()}
    run_opcheck(torch.ops.ssm_kernels.mamba3_step.default, (), {**states, **step, "state_batch_indices": None})


def test_mamba3_compile(device):
    inp = _small(2, device)

    def fn(q, k, v, adt, dt, trap, angles, z, mimo_v, mimo_z, mimo_o, initial_ssm):
        out, states = ssm_kernels.mamba3_scan(q, k, v, adt, dt, trap, angles=angles, z=z, mimo_v=mimo_v,
                                              mimo_z=mimo_z, mimo_o=mimo_o,
                                              initial_states=(None, initial_ssm, None, None), chunk_size=4,
                                              return_final_states=True)
        return out, states[1]

    names = ("q", "k", "v", "adt", "dt", "trap", "angles", "z", "mimo_v", "mimo_z", "mimo_o", "initial_ssm")
    check_compile(fn, *[inp[n] for n in names])


def test_mamba3_gradcheck():
    inp = _small(2, "cpu", F64)
    inp["chunk_size"] = 4
    names = [k for k, v in inp.items() if isinstance(v, torch.Tensor)]
    tensors = [inp[n].detach().double().requires_grad_(True) for n in names]

    def fn(*ts):
        kw = dict(zip(names, ts))
        kw["chunk_size"] = 4
        out, final = call(ssm_kernels.mamba3_scan, kw)
        return (out, *final)

    check_gradcheck(fn, tensors, eps=1e-6, atol=1e-6, fast_mode=True)


def test_mamba3_bad_inputs():
    inp = _small(2)
    scan = ssm_kernels.mamba3_scan

    def run(**changes):
        kw = {**inp, **changes}
        return call(scan, kw)

    b, l, r, g, n = inp["q"].shape
    h, p = inp["v"].shape[2], inp["v"].shape[3]
    assert_raises_naming(ValueError, "q", run, q=torch.randn(b, l, r, 3, n), k=torch.randn(b, l, r, 3, n))
    assert_raises_naming(ValueError, "k", run, k=torch.randn(b, l, r, g, n + 2))
    assert_raises_naming(ValueError, "q", run, q=torch.randn(b, l, r, g, 5), k=torch.randn(b, l, r, g, 5),
                         q_bias=None, k_bias=None, angles=None, initial_k=None, initial_ssm=None)
    assert_raises_naming(ValueError, "angles", run, angles=torch.randn(b, l, h, n // 2 + 1))
    assert_raises_naming(ValueError, "v", run, v=torch.randn(b, l + 1, h, p))
    assert_raises_naming(ValueError, "dt", run, dt=torch.rand(b, h + 1, l))
    assert_raises_naming(ValueError, "mimo_v", run, mimo_v=torch.randn(h, r, p + 1))
    assert_raises_naming(ValueError, "mimo_o", run, mimo_o=None)
    assert_raises_naming(ValueError, "mimo_z", run, mimo_z=None)
    assert_raises_naming(ValueError, "initial_ssm", run, initial_ssm=torch.randn(b, h, n, p))
    assert_raises_naming(ValueError, "initial_k", run, initial_k=torch.randn(b, h, n))
    assert_raises_naming(ValueError, "chunk_size", run, chunk_size=0)
    assert_raises_naming(TypeError, "q", run, q=inp["q"].half(), k=inp["k"].half())
    assert_raises_naming(TypeError, "initial_v", run, initial_v=torch.zeros(b, h, r, p, dtype=torch.int32))
    assert_raises_naming(TypeError, "trap", run, trap=[0.0])
    assert_raises_naming(TypeError, "initial_states", scan, inp["q"], inp["k"], inp["v"], inp["adt"], inp["dt"],
                         inp["trap"], initial_states=inp["initial_ssm"])
    siso = _small(0)
    assert_raises_naming(ValueError, "mimo_o", call, scan, {**siso, "mimo_o": torch.randn(h, 1, p)})
    # the decode step's states: shapes and dtypes
    states = [siso[n].clone() for n in STATE_NAMES]
    args = (siso["q"][:, 0], siso["k"][:, 0], siso["v"][:, 0], siso["adt"][..., 0], siso["dt"][..., 0],
            siso["trap"][..., 0])
    ang = siso["angles"][:, 0]

    def step(*a, **kw):
        return ssm_kernels.mamba3_step(*a, angles=ang, **kw)

    assert_raises_naming(TypeError, "ssm_state", step, states[0], states[1].double(), *states[2:], *args)
    assert_raises_naming(ValueError, "k_state", step, states[0], states[1], states[2][..., :-1], states[3], *args)
    assert_raises_naming(ValueError, "angle_state", step, states[0][..., :0], *states[1:], *args)
    assert_raises_naming(ValueError, "state_batch_indices", step, *states, *args,
                         state_batch_indices=torch.tensor([5]))


def test_mamba3_compat_mamba_ssm_names():
    from ssm_kernels.compat import mamba_ssm as compat

    case = Case(13, 4, F32, rope="half", z=True, D=True, bias=True, init=True, batch=2, nheads=4, dqk=8, dv=6)
    inp = make_inputs(case)
    args = [inp[n] for n in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")]
    init = tuple(inp[n] for n in STATE_NAMES)
    want, want_final = call(ssm_kernels.mamba3_scan, inp)
    got = compat.mamba3_siso_combined(*args, Input_States=init, chunk_size=4, return_final_states=True)
    assert len(got) == 5
    assert_close(got[0], want, F32, "mamba3_siso_combined")
    for a, e in zip(got[1:], want_final):
        assert_close(a, e, F32, "final state")
    # packed sequences (batch 1, cu_seqlens): each from its own initial state
    cu = torch.tensor([0, 13, 26])
    packed = [t.flatten(0, 1)[None] if t.dim() == 4 and t.shape[1] == 13 else t for t in args]
    for i in (3, 4, 5):  # adt, dt, trap: [B, H, L] -> [1, H, B L]
        packed[i] = args[i].transpose(0, 1).flatten(1)[None]
    out = compat.mamba3_siso_combined(*packed, Input_States=init, chunk_size=4, cu_seqlens=cu)
    assert_close(out[0].unflatten(0, (2, 13)), want, F32, "packed")

    s_args = [a[:, 0] if a.dim() == 4 else (a[..., 0] if a.dim() == 3 else a) for a in args]
    s_args[6], s_args[7], s_args[9] = inp["q_bias"], inp["k_bias"], inp["D"]
    before = [t.clone() for t in init]
    out, states = compat.mamba3_siso_step(*s_args, Input_States=init)
    assert all(torch.equal(a, b) for a, b in zip(init, before)), "mamba3_siso_step modified its inputs"
    one, one_final = call(ssm_kernels.mamba3_scan, {**inp, **{k: v[:, :1] for k in ("q", "k", "v", "z", "angles")
                                                              for v in [inp[k]]},
                                                    **{k: inp[k][..., :1] for k in ("adt", "dt", "trap")}})
    assert_close(out, one[:, 0], F32, "mamba3_siso_step")
    assert_close(states[1], one_final[1], F32, "step ssm state")
    assert torch.equal(states[3], inp["v"][:, 0])


def test_mamba3_compat_mimo():
    from ssm_kernels.compat import mamba_ssm as compat

    case = Case(10, 4, F32, rank=2, rope="half", z=True, D=True, bias=True, nheads=2, dqk=8, dv=4)
    inp = make_inputs(case)
    want, want_final = call(ssm_kernels.mamba3_scan, inp)
    args = [inp[n] for n in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "mimo_v", "mimo_z", "mimo_o",
                             "angles", "D", "z")]
    got = compat.mamba3_mimo(*args, chunk_size=4, rotary_dim_divisor=4, dtype=F32, return_state=True)
    assert_close(got[0], want, F32, "mamba3_mimo")
    for a, e in zip(got[1:], want_final):
        assert_close(a, e, F32, "final state")
    args[10] = None
    per_rank = compat.mamba3_mimo(*args, chunk_size=4, rotary_dim_divisor=4, dtype=F32)
    assert per_rank.shape == (2, 10, 2, 2, 4)
    mixed = (per_rank * inp["mimo_o"].transpose(0, 1)).sum(2)
    assert_close(mixed, want, F32, "per-rank outputs")
    with pytest.raises(NotImplementedError):
        compat.mamba3_mimo(*args, chunk_size=4, rotary_dim_divisor=4, dtype=F32, fuse_pregate_headwise_rms_norm=True)
