"""ssd_scan (Mamba-2 chunked SSD) against the float64 reference, forward and every gradient."""
import contextlib
import math
from dataclasses import dataclass, field

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


@dataclass
class Case:
    seqlen: int
    chunk: int
    dtype: torch.dtype
    groups: str = "1"  # "1", "2" or "H" (one group per head)
    D: str = ""  # "", "h" (nheads,) or "hp" (nheads, headdim)
    z: bool = False
    dt_bias: bool = False
    softplus: bool = False
    limit: bool = False
    init: bool = False
    seq: bool = False
    batch: int = 2
    nheads: int = 4
    headdim: int = 8
    dstate: int = 16
    extra: dict = field(default_factory=dict)

    def id(self):
        opts = [f"g{self.groups}"]
        opts += [f"D{self.D}"] if self.D else []
        opts += [name for name in ("z", "dt_bias", "softplus", "limit", "init", "seq") if getattr(self, name)]
        return f"L{self.seqlen}-Q{self.chunk}-{testing.dtype_id(self.dtype)}-" + "-".join(opts)


# A covering design: every seqlen, chunk size, dtype, group layout and option appears, combined so
# that each option meets several seqlens, chunk sizes and dtypes.
CASES = [
    Case(1, 16, F32, "1", D="h"),
    Case(1, 256, BF16, "H", z=True, init=True, seq=True),
    Case(63, 64, F32, "2", D="hp", z=True, dt_bias=True, softplus=True),
    Case(63, 16, F16, "H", init=True, seq=True, limit=True, softplus=True),
    Case(64, 64, BF16, "H", init=True, seq=True, D="h"),
    Case(64, 16, F32, "1", z=True, limit=True),
    Case(65, 64, F16, "1", limit=True, softplus=True, z=True, dt_bias=True),
    Case(65, 64, F32, "H", init=True, D="hp", seq=True),
    Case(255, 16, F32, "H", seq=True, init=True, D="h", dt_bias=True),
    Case(255, 64, BF16, "2", z=True, softplus=True, limit=True),
    Case(256, 256, BF16, "2", z=True, dt_bias=True, D="hp"),
    Case(256, 64, F32, "1", init=True, softplus=True, dt_bias=True),
    Case(257, 256, F32, "1", D="hp", z=True, dt_bias=True, softplus=True, limit=True, init=True, seq=True),
    Case(257, 16, F16, "2", D="h", init=True),
    Case(1000, 64, F32, "2", seq=True, z=True, limit=True, softplus=True, batch=1, nheads=4, headdim=4, dstate=8),
    Case(1000, 256, F16, "H", D="hp", init=True, dt_bias=True, batch=1, nheads=2, headdim=4, dstate=8),
    # one long case: the float64 loop reference costs ~10 ms per step for the backward
    Case(4096, 256, F32, "1", init=True, D="h", seq=True, dt_bias=True, softplus=True, batch=1, nheads=2,
         headdim=4, dstate=8),
    Case(1000, 16, BF16, "2", z=True, limit=True, batch=1, nheads=2, headdim=4, dstate=8),
]


def make_inputs(case: Case, device, strided=False):
    b, l, h, p, n = case.batch, case.seqlen, case.nheads, case.headdim, case.dstate
    g = {"1": 1, "2": 2, "H": h}[case.groups]
    dt_ = case.dtype
    inp = {
        "x": testing.make_tensor((b, l, h, p), dt_, device, strided=strided),
        # softplus maps roughly [-4, -1] to [0.02, 0.3]; without it dt is used as given
        "dt": testing.make_tensor((b, l, h), dt_, device, strided=strided,
                          low=-4.0 if case.softplus else 0.005, high=-1.0 if case.softplus else 0.15),
        "A": -testing.make_tensor((h,), F32, device, low=0.2, high=2.0),
        "B": testing.make_tensor((b, l, g, n), dt_, device, strided=strided, scale=n**-0.5),
        "C": testing.make_tensor((b, l, g, n), dt_, device, strided=strided),
        "chunk_size": case.chunk,
        "dt_softplus": case.softplus,
    }
    if case.D == "h":
        inp["D"] = testing.make_tensor((h,), F32, device)
    elif case.D == "hp":
        inp["D"] = testing.make_tensor((h, p), F32, device)
    if case.z:
        inp["z"] = testing.make_tensor((b, l, h, p), dt_, device, strided=strided)
    if case.dt_bias:
        inp["dt_bias"] = testing.make_tensor((h,), F32, device, low=-0.3, high=0.3) * (1.0 if case.softplus else 0.1)
    if case.limit:
        inp["dt_limit"] = (0.03, 0.12) if not case.softplus else (0.05, 0.2)
    if case.init:
        inp["initial_states"] = testing.make_tensor((b, h, p, n), F32, device)
    if case.seq:
        # packed sequences: boundaries at random positions, including one at a chunk start
        cuts = sorted(set(torch.randint(1, max(l, 2), (3,)).tolist() + [min(case.chunk, l - 1)]))
        seq = torch.zeros(b, l, dtype=torch.int32)
        for c in cuts:
            if 0 < c < l:
                seq[:, c:] += 1
        seq[-1, l // 2:] += 1
        inp["seq_idx"] = seq.to(device)
    return inp


def run_with_grads(fn, inp, wide=None):
    """fn's (out, final_states) and the gradients of every floating input."""
    leaves = {k: (testing.clone_leaf(v, wide) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in inp.items()}
    out, final = fn(**leaves, return_final_states=True)
    return leaves, out, final


def check_against_reference(case, inp, tolerances=None):
    """Forward and every gradient against the float64 reference, within the dtype's tolerance or
    the one given by name in tolerances."""
    tolerances = tolerances or {}
    ours_in, out, final = run_with_grads(ssm_kernels.ssd_scan, inp)
    ref_in, ref_out, ref_final = run_with_grads(reference.ssd_scan, inp, wide=torch.float64)
    assert out.dtype == case.dtype and final.dtype == torch.float32
    testing.assert_close(out, ref_out, case.dtype, "out")
    testing.assert_close(final, ref_final, case.dtype, "final_states")

    # the same (rounded) output gradients for both: rounding them differently would perturb sums
    # with heavy cancellation such as dA
    g_out = torch.randn_like(ref_out).to(out.dtype).to(torch.float64)
    g_final = torch.randn_like(ref_final).to(final.dtype).to(torch.float64)
    names = [k for k in NAMES if k in inp]
    got = testing.grads([out, final], [ours_in[k] for k in names], [g_out.to(out.dtype), g_final.to(final.dtype)])
    want = testing.grads([ref_out, ref_final], [ref_in[k] for k in names], [g_out, g_final])
    for name, a, e in zip(names, got, want):
        assert a is not None, f"no gradient for {name}"
        assert a.dtype == inp[name].dtype and a.shape == inp[name].shape, name
        testing.assert_close(a, e, case.dtype, f"grad {name}", tol=tolerances.get(name))


@pytest.mark.parametrize("case", CASES, ids=[c.id() for c in CASES])
def test_ssd_forward_backward(case, device):
    check_against_reference(case, make_inputs(case, device))


@contextlib.contextmanager
def cuda_rounding_emulated():
    previous = torch.ops.ssm_kernels_test.ssd_emulate_cuda_rounding(True)
    try:
        yield
    finally:
        torch.ops.ssm_kernels_test.ssd_emulate_cuda_rounding(previous)


HALF_CASES = [c for c in CASES if c.dtype in (F16, BF16)]


@pytest.mark.parametrize("case", HALF_CASES, ids=[c.id() for c in HALF_CASES])
def test_ssd_half_grads_with_cuda_rounding(case):
    # The CPU stages round GEMM operands to the input dtype where the CUDA tensor cores do. dA sums
    # terms that largely cancel: it must come from the float32 products of the backward, so it
    # stays within the float32 tolerance although the inputs are 16-bit (CUDA bf16 once gave 1.5e-2).
    inp = make_inputs(case, "cpu")
    with cuda_rounding_emulated():
        out = ssm_kernels.ssd_scan(**{k: v for k, v in inp.items()})
        check_against_reference(case, inp, tolerances={"A": testing.tolerance(F32)})
    assert not torch.equal(out, ssm_kernels.ssd_scan(**inp)), "the emulation changed nothing"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=testing.dtype_id)
def test_ssd_chunk_size_changes_only_rounding(dtype, device):
    case = Case(300, 16, dtype, "2", D="hp", z=True, dt_bias=True, softplus=True, init=True, seq=True)
    inp = make_inputs(case, device)
    results = []
    for chunk in (16, 32, 64, 128, 256):
        leaves, out, final = run_with_grads(ssm_kernels.ssd_scan, {**inp, "chunk_size": chunk})
        g = testing.grads([out, final], [leaves["x"], leaves["dt"], leaves["B"]],
                  [torch.ones_like(out), torch.ones_like(final)])
        results.append([out, final] + g)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            testing.assert_close(a, b, dtype, "chunk_size dependence")


def test_ssd_strided_inputs(device):
    case = Case(130, 64, F32, "2", D="hp", z=True, dt_bias=True, softplus=True, init=True, seq=True)
    inp = make_inputs(case, device, strided=True)
    assert not inp["x"].is_contiguous() and not inp["B"].is_contiguous()
    testing.assert_runs_equal(run_with_grads(ssm_kernels.ssd_scan, inp),
                              run_with_grads(ssm_kernels.ssd_scan, testing.contiguous_copies(inp)),
                              [k for k in NAMES if k in inp])


def test_ssd_seq_idx_no_leakage(device):
    """Nothing crosses a sequence boundary: not the outputs, not the gradients (both directions)."""
    case = Case(200, 64, F32, "1", D="h", z=True, init=True)
    inp = make_inputs(case, device)
    cut = 77  # inside the second chunk
    seq = torch.zeros(case.batch, case.seqlen, dtype=torch.int32, device=device)
    seq[:, cut:] = 1
    inp["seq_idx"] = seq
    leaves, out, final = run_with_grads(ssm_kernels.ssd_scan, inp)
    # the loss on the second sequence does not reach the inputs of the first (nor the initial state)
    names = ["x", "dt", "B", "C", "z", "initial_states"]
    g = testing.grads([out], [leaves[k] for k in names], [torch.cat([torch.zeros_like(out[:, :cut]), torch.ones_like(out[:, cut:])], 1)])
    for name, t in zip(names, g):
        if name == "initial_states":
            assert torch.count_nonzero(t) == 0, name
        else:
            assert torch.count_nonzero(t[:, :cut]) == 0, name
    # the loss on the first sequence does not reach the inputs of the second
    leaves, out, final = run_with_grads(ssm_kernels.ssd_scan, inp)
    g = testing.grads([out, final], [leaves[k] for k in names],
              [torch.cat([torch.ones_like(out[:, :cut]), torch.zeros_like(out[:, cut:])], 1), torch.zeros_like(final)])
    for name, t in zip(names, g):
        if name != "initial_states":
            assert torch.count_nonzero(t[:, cut:]) == 0, name
    # changing the first sequence's inputs leaves the second's outputs unchanged
    inp2 = dict(inp)
    for name in ("x", "dt", "B", "C", "z"):
        inp2[name] = inp[name].clone()
        inp2[name][:, :cut] *= 1.5
    out2 = ssm_kernels.ssd_scan(**inp2)
    assert torch.equal(out2[:, cut:], out[:, cut:].detach())


def test_ssd_gradients_reproducible(device):
    case = Case(200, 64, F32, "2", D="hp", z=True, dt_bias=True, softplus=True, init=True, seq=True)
    inp = make_inputs(case, device)
    names = [k for k in NAMES if k in inp]
    runs = []
    for _ in range(2):
        leaves, out, final = run_with_grads(ssm_kernels.ssd_scan, inp)
        runs.append(testing.grads([out, final], [leaves[k] for k in names], [torch.ones_like(out), torch.ones_like(final)]))
    for name, a, b in zip(names, *runs):
        assert torch.equal(a, b), name


def _op_args(inp):
    lo, hi = inp.get("dt_limit", (0.0, math.inf))
    return (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["chunk_size"], inp.get("D"), inp.get("z"),
            inp.get("dt_bias"), inp["dt_softplus"], [lo, hi], inp.get("initial_states"), inp.get("seq_idx"))


@pytest.mark.parametrize("full", [False, True], ids=["plain", "all-options"])
def test_ssd_opcheck(full, device):
    case = Case(40, 16, F32, "2", D="hp", z=True, dt_bias=True, softplus=True, limit=True, init=True, seq=True,
                batch=2, nheads=2, headdim=4, dstate=4) if full else Case(40, 16, F32, "1", nheads=2, headdim=4, dstate=4)
    inp = make_inputs(case, device)
    args = testing.clone_float_args(_op_args(inp))
    testing.run_opcheck(torch.ops.ssm_kernels.ssd_scan_fwd.default, args)
    dout = torch.randn_like(inp["x"])
    dfinal = torch.randn(case.batch, case.nheads, case.headdim, case.dstate, device=device)
    testing.run_opcheck(torch.ops.ssm_kernels.ssd_scan_bwd.default, tuple(_op_args(inp)) + (dout, dfinal))


def test_ssd_compile(device):
    case = Case(100, 32, F32, "2", D="h", z=True, dt_bias=True, softplus=True, init=True, seq=True)
    inp = make_inputs(case, device)

    def fn(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
        return ssm_kernels.ssd_scan(x, dt, A, B, C, chunk_size=32, D=D, z=z, dt_bias=dt_bias, dt_softplus=True,
                                    initial_states=initial_states, seq_idx=seq_idx, return_final_states=True)

    testing.check_compile(fn, inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"],
                  inp["initial_states"], inp["seq_idx"])


def test_ssd_gradcheck(device):
    case = Case(21, 16, torch.float64, "2", D="hp", z=True, dt_bias=True, softplus=True, limit=False, init=True,
                seq=True, batch=1, nheads=2, headdim=2, dstate=3)
    inp = make_inputs(case, device)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    tensors = [inp[k].detach().to(torch.float64).requires_grad_(True) for k in names]

    def fn(*ts):
        kw = dict(zip(names, ts))
        return ssm_kernels.ssd_scan(**kw, chunk_size=16, dt_softplus=True, seq_idx=inp["seq_idx"],
                                    return_final_states=True)

    testing.check_gradcheck(fn, tensors, fast_mode=True)


def test_ssd_dt_limit_gradcheck(device):
    case = Case(20, 16, torch.float64, "1", limit=True, batch=1, nheads=2, headdim=2, dstate=2)
    inp = make_inputs(case, device)
    names = ["x", "dt", "A", "B", "C"]
    tensors = [inp[k].detach().to(torch.float64).requires_grad_(True) for k in names]

    def fn(*ts):
        return ssm_kernels.ssd_scan(*ts, chunk_size=16, dt_limit=(0.03, 0.12))

    testing.check_gradcheck(fn, tensors, fast_mode=True)


def test_ssd_bad_inputs(device):
    case = Case(40, 16, F32, "2", D="h", init=True, seq=True)
    inp = make_inputs(case, device)
    call = ssm_kernels.ssd_scan
    base = {k: inp[k] for k in ("x", "dt", "A", "B", "C")}

    def bad(exc, name, **over):
        testing.assert_raises_naming(exc, name, call, **{**base, **over})

    bad(ValueError, "x", x=inp["x"][0])
    bad(TypeError, "x", x=inp["x"].to(torch.int32))
    bad(ValueError, "dt", dt=inp["dt"][:, :-1])
    bad(TypeError, "dt", dt=inp["dt"].to(torch.float16))
    bad(ValueError, "A", A=inp["A"][:-1])
    bad(ValueError, "B", B=inp["B"][:, :-1])
    bad(ValueError, "B", B=testing.make_tensor((2, 40, 3, 16), F32, device))  # 3 groups do not divide 4 heads
    bad(ValueError, "B", B=testing.make_tensor((2, 40, 2, 300), F32, device), C=testing.make_tensor((2, 40, 2, 300), F32, device))
    bad(TypeError, "B", B=inp["B"].to(torch.bfloat16))
    bad(ValueError, "C", C=inp["C"][..., :-1])
    bad(ValueError, "chunk_size", chunk_size=48)
    bad(ValueError, "chunk_size", chunk_size=8)
    bad(ValueError, "chunk_size", chunk_size=512)
    bad(TypeError, "chunk_size", chunk_size=64.0)
    bad(ValueError, "D", D=inp["D"][:-1])
    bad(ValueError, "D", D=torch.ones(4, 3, device=device))
    bad(ValueError, "z", z=inp["x"][:, :-1])
    bad(TypeError, "z", z=inp["x"].to(torch.float16))
    bad(ValueError, "dt_bias", dt_bias=torch.zeros(3, device=device))
    bad(ValueError, "dt_limit", dt_limit=(0.2, 0.1))
    bad(TypeError, "dt_limit", dt_limit=0.1)
    bad(ValueError, "initial_states", initial_states=inp["initial_states"][:, :-1])
    bad(ValueError, "seq_idx", seq_idx=inp["seq_idx"][:, :-1])
    bad(TypeError, "seq_idx", seq_idx=inp["seq_idx"].to(torch.int64))
    decreasing = inp["seq_idx"].clone()
    decreasing[0, 30:] = -1
    bad(ValueError, "seq_idx", seq_idx=decreasing)
    bad(ValueError, "x", x=inp["x"][:, :0], dt=inp["dt"][:, :0], B=inp["B"][:, :0], C=inp["C"][:, :0])
    bad(ValueError, "x", x=testing.make_tensor((2, 40, 4, 300), F32, device))
    if device == "cpu":
        bad(ValueError, "A", A=inp["A"].to("meta"))


def test_ssd_direct_op_checks_shapes(device):
    """A direct torch.ops call with inconsistent shapes raises instead of reading out of bounds."""
    case = Case(40, 16, F32, "1")
    inp = make_inputs(case, device)
    args = list(_op_args(inp))
    args[3] = inp["B"][:, :-1]
    with pytest.raises((RuntimeError, ValueError), match="B"):
        torch.ops.ssm_kernels.ssd_scan_fwd(*args)
    args = list(_op_args(inp))
    args[5] = 24
    with pytest.raises((RuntimeError, ValueError), match="chunk_size"):
        torch.ops.ssm_kernels.ssd_scan_fwd(*args)


def test_ssd_direct_op_checks_values(device):
    """dt_limit is one (lo, hi) argument of the op; seq_idx's order is checked for CPU tensors only."""
    case = Case(40, 16, F32, "1", seq=True)
    inp = make_inputs(case, device)
    args = list(_op_args(inp))
    args[10] = [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="dt_limit"):
        torch.ops.ssm_kernels.ssd_scan_fwd(*args)
    args = list(_op_args(inp))
    decreasing = inp["seq_idx"].clone()
    decreasing[0, 30:] = -1
    args[12] = decreasing
    if device == "cpu":
        with pytest.raises(ValueError, match="seq_idx"):
            torch.ops.ssm_kernels.ssd_scan_fwd(*args)
    else:
        # Not read on CUDA (no sync): the values are unspecified, every access stays in bounds.
        out, final = torch.ops.ssm_kernels.ssd_scan_fwd(*args)
        torch.cuda.synchronize()
        assert out.shape == inp["x"].shape


def test_ssd_bwd_absent_optional_grads(device):
    """The backward returns an empty [0] tensor of x's dtype for each absent optional input."""
    case = Case(20, 16, F16, "1")
    inp = make_inputs(case, device)
    grads_ = torch.ops.ssm_kernels.ssd_scan_bwd(*_op_args(inp), torch.randn_like(inp["x"]), None)
    for name, g in zip(("dD", "dz", "ddt_bias", "dinitial_states"), grads_[5:]):
        assert g.shape == (0,) and g.dtype == F16, name
