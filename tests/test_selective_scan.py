"""selective_scan and selective_state_update against the float64 references."""
import math

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing
from ssm_kernels.ops.selective_scan import CHUNK_SIZE
from ssm_kernels.testing import assert_close, assert_raises_naming, clone_leaf, dtype_id, make_tensor

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
EXTRAS_ALL = ("D", "z", "bias", "softplus", "init")

# (seqlen, dstate, dtype, complex A, B kind, C kind, extras, strided, batch, dim, groups): a
# covering design in which every listed value appears (chunk boundaries 2047/2048/2049, four
# chunks at 8192; every dtype with real and complex A; fixed/variable/grouped B and C
# independently; each option on and off).
CASES = [
    (1, 16, F32, False, "var", "var", EXTRAS_ALL, False, 2, 3, 1),
    (2, 1, BF16, False, "fixed", "fixed", (), False, 2, 3, 1),
    (17, 64, F16, True, "var", "grp", EXTRAS_ALL, True, 2, 4, 2),
    (255, 16, F32, True, "fixed", "var", ("D", "z"), False, 2, 3, 1),
    (256, 256, F32, False, "grp", "fixed", ("bias", "softplus", "init"), False, 1, 4, 2),
    (257, 16, BF16, False, "grp", "grp", EXTRAS_ALL, True, 2, 6, 3),
    (2047, 16, F32, False, "var", "var", EXTRAS_ALL, False, 1, 3, 1),
    (2048, 16, F32, False, "var", "var", EXTRAS_ALL, False, 1, 2, 1),
    (2049, 16, F16, False, "var", "fixed", ("init", "softplus"), True, 1, 3, 1),
    (2049, 1, BF16, True, "grp", "fixed", EXTRAS_ALL, False, 1, 2, 2),
    (257, 256, F32, True, "var", "var", ("init",), False, 1, 2, 1),
    (17, 16, F32, False, "fixed", "fixed", EXTRAS_ALL, True, 2, 5, 1),
    # The reference's backward costs O(L) per step for every per-step slice (quadratic in L), so
    # the longest case keeps B small.
    (8192, 4, F32, False, "var", "fixed", ("D", "z", "bias", "softplus"), False, 1, 1, 1),
    # Wide enough that a backward task/block owns several channels of a group.
    (40, 16, F32, False, "var", "grp", EXTRAS_ALL, False, 1, 256, 2),
    (33, 8, F32, True, "grp", "var", EXTRAS_ALL, True, 2, 128, 2),
]


def case_id(case):
    L, N, dtype, cplx, bk, ck, extras, strided, batch, dim, groups = case
    ex = "+".join(extras) if extras else "plain"
    return f"L{L}-N{N}-{dtype_id(dtype)}-{'cplx' if cplx else 'real'}-B{bk}-C{ck}-{ex}" + ("-strided" if strided else "")


def make_inputs(L, N, dtype, cplx, bk, ck, extras, strided, batch, dim, groups, device="cpu"):
    wdtype = torch.complex64 if cplx else torch.float32
    if dtype == F64:
        wdtype = torch.complex128 if cplx else torch.float64
    real_w = torch.float64 if dtype == F64 else torch.float32
    mk = lambda shape, dt, **kw: make_tensor(shape, dt, device, strided=strided, **kw)  # noqa: E731
    u = mk((batch, dim, L), dtype)
    delta = mk((batch, dim, L), dtype, low=-1.0 if "softplus" in extras else 0.05, high=1.0)
    A_re = -torch.rand(dim, N, device=device, dtype=real_w) * 2 - 0.1
    A = torch.complex(A_re, torch.randn(dim, N, device=device, dtype=real_w) * 3) if cplx else A_re

    def bc(kind):
        bdtype = wdtype if cplx else dtype
        if kind == "fixed":
            return make_tensor((dim, N), wdtype, device)
        if kind == "var":
            return mk((batch, N, L), bdtype)
        return mk((batch, groups, N, L), bdtype)

    inp = {"u": u, "delta": delta, "A": A, "B": bc(bk), "C": bc(ck)}
    inp["D"] = torch.randn(dim, device=device, dtype=real_w) if "D" in extras else None
    inp["z"] = mk((batch, dim, L), dtype) if "z" in extras else None
    inp["delta_bias"] = torch.rand(dim, device=device, dtype=real_w) - 0.5 if "bias" in extras else None
    inp["delta_softplus"] = "softplus" in extras
    inp["initial_state"] = make_tensor((batch, dim, N), wdtype, device) if "init" in extras else None
    return inp


DIFF = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def wide(t):
    return torch.complex128 if t.is_complex() else torch.float64


def run_both(inp, seed=1):
    """Forward and every gradient of ours and of the reference, with the same output gradients."""
    ours_in = {k: (clone_leaf(v) if k in DIFF else v) for k, v in inp.items()}
    ref_in = {k: (clone_leaf(v, wide(v)) if (k in DIFF and v is not None) else v) for k, v in inp.items()}
    out, last = ssm_kernels.selective_scan(**ours_in, return_last_state=True)
    rout, rlast = reference.selective_scan(**ref_in, return_last_state=True)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g_out = torch.randn(rout.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    g_last = torch.randn(rlast.shape, generator=gen, dtype=rlast.dtype).to(last.device, last.dtype)
    names = [k for k in DIFF if inp.get(k) is not None]
    g_ours = testing.grads([out, last], [ours_in[k] for k in names], [g_out, g_last])
    g_ref = testing.grads([rout, rlast], [ref_in[k] for k in names], [g_out.to(torch.float64), g_last.to(rlast.dtype)])
    return (out, last, dict(zip(names, g_ours))), (rout, rlast, dict(zip(names, g_ref)))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_selective_scan_matches_reference(case, device):
    inp = make_inputs(*case, device=device)
    dtype = case[2]
    (out, last, g), (rout, rlast, rg) = run_both(inp)
    assert out.dtype == dtype and out.shape == inp["u"].shape
    assert last.dtype == (torch.complex64 if case[3] else torch.float32)
    assert_close(out, rout, dtype, "out")
    assert_close(last, rlast, dtype, "last_state")
    testing.assert_grads_close(g, rg, inp, dtype)


def test_selective_scan_checkpoints_are_per_chunk(device):
    # The saved context is one state per chunk: [B, D, ceil(L / kChunk), N], not per step.
    inp = make_inputs(2 * CHUNK_SIZE + 1, 4, F32, False, "var", "var", (), False, 1, 2, 1, device)
    out, last, ckpt = torch.ops.ssm_kernels.selective_scan_fwd(
        inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], None, None, None, False, None, None, None)
    assert ckpt.shape == (1, 2, 3, 4)
    assert torch.equal(ckpt[:, :, 0], torch.zeros_like(ckpt[:, :, 0]))


def test_selective_scan_channel_last_inputs(device):
    inp = make_inputs(300, 16, F32, False, "var", "var", EXTRAS_ALL, False, 2, 8, 1, device)
    ref = ssm_kernels.selective_scan(**inp)
    for k in ("u", "delta", "z"):
        inp[k] = testing.make_channel_last(inp[k])
    assert_close(ssm_kernels.selective_scan(**inp), ref, F32)


@pytest.mark.parametrize("bk,ck,cplx", [("var", "grp", False), ("fixed", "var", True), ("grp", "fixed", False)],
                         ids=["Bvar-Cgrp-real", "Bfixed-Cvar-cplx", "Bgrp-Cfixed-real"])
def test_selective_scan_gradients_bitwise_reproducible(bk, ck, cplx, device):
    # Several slices per group and several chunks: the fixed-order reductions are exercised.
    inp = make_inputs(2100, 16, F32, cplx, bk, ck, EXTRAS_ALL, False, 1, 256, 4, device)
    names = [k for k in DIFF if inp.get(k) is not None]

    def run():
        ins = {k: (clone_leaf(v) if k in DIFF else v) for k, v in inp.items()}
        out, last = ssm_kernels.selective_scan(**ins, return_last_state=True)
        gen = torch.Generator(device="cpu").manual_seed(1)
        g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
        g_last = torch.randn(last.shape, generator=gen, dtype=last.dtype).to(last.device)
        return testing.grads([out, last], [ins[k] for k in names], [g_out, g_last])

    testing.assert_deterministic(run)


def test_selective_scan_unused_last_state_gradient(device):
    # Only out is used: the last-state gradient arrives as zeros/None and must not matter.
    inp = make_inputs(40, 8, F32, False, "var", "var", ("D",), False, 2, 3, 1, device)
    u = clone_leaf(inp["u"])
    ssm_kernels.selective_scan(**{**inp, "u": u}).sum().backward()
    ru = clone_leaf(inp["u"], F64)
    reference.selective_scan(**{**inp, "u": ru}).sum().backward()
    assert_close(u.grad, ru.grad, F32)


def test_selective_scan_opcheck(device):
    inp = make_inputs(33, 4, F32, False, "var", "grp", EXTRAS_ALL, False, 2, 4, 2, device)
    args = [inp[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args = [clone_leaf(a) for a in args]
    testing.run_opcheck(torch.ops.ssm_kernels.selective_scan_fwd, (*args, True, clone_leaf(inp["initial_state"]), None, None))
    cinp = make_inputs(20, 3, F32, True, "var", "fixed", ("init",), False, 1, 2, 1, device)
    testing.run_opcheck(torch.ops.ssm_kernels.selective_scan_fwd,
                        (cinp["u"], cinp["delta"], cinp["A"], cinp["B"], cinp["C"], None, None, None, False,
                         cinp["initial_state"], None, None))
    out, last, ckpt = torch.ops.ssm_kernels.selective_scan_fwd(*[a.detach() for a in args], True, None, None, None)
    testing.run_opcheck(torch.ops.ssm_kernels.selective_scan_bwd,
                        (*[a.detach() for a in args], True, None, ckpt, torch.randn_like(out), torch.randn_like(last)))


def test_selective_scan_compile(device):
    inp = make_inputs(50, 8, F32, False, "var", "var", EXTRAS_ALL, False, 2, 3, 1, device)

    def fn(u, delta, A, B, C, D, z, delta_bias, initial_state):
        out, last = ssm_kernels.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, initial_state,
                                               return_last_state=True)
        return out * 2, last

    args = [clone_leaf(inp[k]) for k in DIFF]
    testing.check_compile(fn, *args)
    out, last = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    (out.sum() + last.sum()).backward()
    assert all(a.grad is not None for a in args)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "cplx"])
def test_selective_scan_gradcheck(cplx, device):
    inp = make_inputs(5, 2, F64, cplx, "var", "grp", EXTRAS_ALL, False, 1, 2, 2, device)
    names = [k for k in DIFF]
    leaves = [clone_leaf(inp[k]) for k in names]

    def fn(*ts):
        kw = dict(zip(names, ts))
        out, last = ssm_kernels.selective_scan(**kw, delta_softplus=True, return_last_state=True)
        return out, torch.view_as_real(last) if last.is_complex() else last

    testing.check_gradcheck(fn, leaves)


def _bad_cases():
    def base(**over):
        inp = make_inputs(8, 4, F32, False, "var", "var", ("D", "z", "bias", "init"), False, 2, 4, 1)
        inp.update(over)
        return inp

    A_c = torch.complex(-torch.rand(4, 4), torch.randn(4, 4))
    return [
        ("u", base(u=torch.randn(2, 4)), ValueError),
        ("u", base(u=torch.randn(2, 4, 8, dtype=torch.float64).int()), TypeError),
        ("delta", base(delta=torch.rand(2, 4, 7)), ValueError),
        ("delta", base(delta=torch.rand(2, 4, 8, dtype=BF16)), TypeError),
        ("A", base(A=-torch.rand(5, 4)), ValueError),
        ("A", base(A=-torch.rand(4, 4, dtype=BF16)), TypeError),
        ("A", base(A=-torch.rand(4, 257), B=torch.randn(2, 257, 8), C=torch.randn(2, 257, 8),
                   initial_state=None), ValueError),
        ("B", base(B=torch.randn(2, 5, 8)), ValueError),
        ("B", base(B=torch.randn(2, 3, 4, 8)), ValueError),  # groups not dividing dim
        ("B", base(B=torch.randn(2, 4, 8, dtype=torch.complex64)), TypeError),  # complex B, real A
        ("B", base(B=torch.randn(2, 4, 8, dtype=BF16)), TypeError),
        ("C", base(C=torch.randn(4, 3)), ValueError),
        ("C", base(A=A_c, B=torch.randn(4, 4, dtype=torch.complex64), C=torch.randn(2, 4, 8), initial_state=None),
         TypeError),
        ("D", base(D=torch.randn(5)), ValueError),
        ("z", base(z=torch.randn(2, 4, 9)), ValueError),
        ("delta_bias", base(delta_bias=torch.randn(4, 1)), ValueError),
        ("initial_state", base(initial_state=torch.randn(2, 4, 5)), ValueError),
        ("initial_state", base(initial_state=torch.randn(2, 4, 4, dtype=torch.complex64)), TypeError),
        ("delta", base(delta=torch.rand(2, 4, 8, device="meta")), ValueError),
    ]


@pytest.mark.parametrize("argname,inp,exc", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_selective_scan_bad_inputs(argname, inp, exc):
    assert_raises_naming(exc, argname, ssm_kernels.selective_scan, **inp)


def test_selective_scan_bad_inputs_direct_op():
    # A direct torch.ops call is re-checked in C++ before any kernel runs.
    inp = make_inputs(8, 4, F32, False, "var", "var", (), False, 2, 4, 1)
    with pytest.raises(ValueError, match="B"):
        torch.ops.ssm_kernels.selective_scan_fwd(inp["u"], inp["delta"], inp["A"], torch.randn(2, 4, 7),
                                                 inp["C"], None, None, None, False, None, None, None)
    with pytest.raises(ValueError, match="A"):
        torch.ops.ssm_kernels.selective_scan_fwd(inp["u"], inp["delta"], -torch.rand(4, 300),
                                                 inp["B"], inp["C"], None, None, None, False, None, None, None)
    out, last, ckpt = torch.ops.ssm_kernels.selective_scan_fwd(
        inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], None, None, None, False, None, None, None)
    with pytest.raises(ValueError, match="checkpoints"):
        torch.ops.ssm_kernels.selective_scan_bwd(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], None, None,
                                                 None, False, None, ckpt[:, :1, :, :], out, None)


def test_selective_scan_bwd_absent_optional_grads_are_empty():
    # The backward returns d<input> shaped and typed like each input, and an empty tensor (u's
    # dtype) for each absent optional input.
    inp = make_inputs(8, 4, BF16, False, "var", "fixed", (), False, 2, 4, 1)
    out, last, ckpt = torch.ops.ssm_kernels.selective_scan_fwd(
        inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], None, None, None, False, None, None, None)
    grads = torch.ops.ssm_kernels.selective_scan_bwd(
        inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], None, None, None, False, None, ckpt,
        torch.randn_like(out), None)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = grads
    for name, g in (("u", du), ("delta", ddelta), ("A", dA), ("B", dB), ("C", dC)):
        assert g.shape == inp[name].shape and g.dtype == inp[name].dtype, name
    for g in (dD, dz, ddelta_bias, dinit):
        assert g.shape == (0,) and g.dtype == BF16


# selective_state_update

UPDATE_CASES = [
    # (heads layout, batch, nheads, headdim, dstate, groups, dtype, extras, indices)
    (False, 3, 1, 5, 16, 1, F32, EXTRAS_ALL, False),
    (False, 2, 1, 7, 1, 1, BF16, (), True),
    (True, 3, 4, 3, 64, 2, F16, EXTRAS_ALL, True),
    (True, 2, 6, 4, 256, 3, F32, ("D", "softplus"), False),
    (True, 4, 2, 8, 16, 1, BF16, ("z", "bias"), True),
]


def update_id(c):
    heads, batch, H, P, N, G, dtype, extras, idx = c
    ex = "+".join(extras) if extras else "plain"
    return f"{'heads' if heads else 'noheads'}-H{H}-P{P}-N{N}-G{G}-{dtype_id(dtype)}-{ex}" + ("-idx" if idx else "")


def make_update_inputs(heads, batch, H, P, N, G, dtype, extras, idx, device):
    inner = (H, P) if heads else (P,)
    state_batch = batch + 2 if idx else batch
    inp = {
        "state": torch.randn(state_batch, *inner, N, device=device),
        "x": make_tensor((batch, *inner), dtype, device, strided=True),
        "dt": make_tensor((batch, *inner), dtype, device, low=-1.0, high=1.0),
        "A": -torch.rand(*inner, N, device=device) - 0.1,
        "B": torch.randn(batch, G, N, device=device) if heads else torch.randn(batch, N, device=device),
        "C": torch.randn(batch, G, N, device=device) if heads else torch.randn(batch, N, device=device),
        "D": torch.randn(*inner, device=device) if "D" in extras else None,
        "z": make_tensor((batch, *inner), dtype, device) if "z" in extras else None,
        "dt_bias": torch.rand(*inner, device=device) if "bias" in extras else None,
        "dt_softplus": "softplus" in extras,
        "state_batch_indices": None,
    }
    if idx:
        perm = torch.randperm(state_batch)[:batch].to(torch.int32)
        perm[0] = -1
        inp["state_batch_indices"] = perm.to(device)
    return inp


@pytest.mark.parametrize("case", UPDATE_CASES, ids=[update_id(c) for c in UPDATE_CASES])
def test_selective_state_update_matches_reference(case, device):
    inp = make_update_inputs(*case, device)
    ref_state = inp["state"].clone()
    got = ssm_kernels.selective_state_update(**inp)
    want = reference.selective_state_update(**{**inp, "state": ref_state})
    assert got.dtype == inp["x"].dtype and got.shape == inp["x"].shape
    assert_close(got, want, case[6], "out")
    assert_close(inp["state"], ref_state, torch.float32, "state")
    if inp["state_batch_indices"] is not None:
        assert torch.all(got[0] == 0)


def test_selective_state_update_steps_equal_selective_scan(device):
    inp = make_inputs(12, 16, F32, False, "var", "var", EXTRAS_ALL, False, 2, 5, 1, device)
    out, last = ssm_kernels.selective_scan(**inp, return_last_state=True)
    state = inp["initial_state"].clone()
    steps = []
    for t in range(inp["u"].shape[-1]):
        steps.append(ssm_kernels.selective_state_update(
            state, inp["u"][..., t], inp["delta"][..., t], inp["A"], inp["B"][..., t], inp["C"][..., t],
            inp["D"], inp["z"][..., t], inp["delta_bias"], True))
    assert_close(torch.stack(steps, -1), out, F32, "steps")
    assert_close(state, last, F32, "state")


def test_selective_state_update_opcheck_and_compile(device):
    inp = make_update_inputs(True, 2, 4, 3, 8, 2, F32, EXTRAS_ALL, True, device)
    args = [inp[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus",
                             "state_batch_indices")]
    testing.run_opcheck(torch.ops.ssm_kernels.selective_state_update, tuple(args))
    state2 = inp["state"].clone()

    def fn(state):
        return ssm_kernels.selective_state_update(state, *args[1:])

    want = fn(state2.clone())
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(state2)
    assert_close(got, want, F32)


def test_selective_state_update_bad_inputs():
    inp = make_update_inputs(True, 2, 4, 3, 8, 2, F32, EXTRAS_ALL, False, "cpu")
    cases = [
        ("state", {"state": torch.randn(2, 4, 3, 8, dtype=BF16)}, TypeError),
        ("state", {"state": torch.randn(2, 4, 2, 8)}, ValueError),
        ("state", {"state": torch.randn(3, 4, 3, 8)}, ValueError),
        ("dt", {"dt": torch.randn(2, 4, 2)}, ValueError),
        ("A", {"A": torch.randn(4, 3, 7)}, ValueError),
        ("B", {"B": torch.randn(2, 3, 8)}, ValueError),
        ("C", {"C": torch.randn(2, 1, 8)}, ValueError),
        ("D", {"D": torch.randn(4)}, ValueError),
        ("z", {"z": torch.randn(2, 4, 3, dtype=BF16)}, TypeError),
        ("state_batch_indices", {"state_batch_indices": torch.tensor([0, 5], dtype=torch.int32)}, ValueError),
        ("state_batch_indices", {"state_batch_indices": torch.tensor([0.0, 1.0])}, TypeError),
    ]
    for name, over, exc in cases:
        assert_raises_naming(exc, name, ssm_kernels.selective_state_update, **{**inp, **over})


def test_selective_state_update_out_of_range_index_cpu():
    # CPU indices are checked on the host before anything is written (on CUDA, where that would
    # need a device sync, an index >= the state's batch is a padding row like a negative one).
    inp = make_update_inputs(True, 2, 4, 3, 8, 2, F32, EXTRAS_ALL, True, "cpu")
    before = inp["state"].clone()
    bad = {**inp, "state_batch_indices": torch.tensor([1, inp["state"].shape[0]], dtype=torch.int64)}
    assert_raises_naming(ValueError, "state_batch_indices", ssm_kernels.selective_state_update, **bad)
    args = [bad[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus",
                             "state_batch_indices")]
    assert_raises_naming(ValueError, "state_batch_indices", torch.ops.ssm_kernels.selective_state_update, *args)
    assert torch.equal(inp["state"], before)
    # A negative index touches no state row and outputs zeros.
    pad = {**inp, "state_batch_indices": torch.tensor([-1, 3], dtype=torch.int32)}
    out = ssm_kernels.selective_state_update(**pad)
    assert torch.all(out[0] == 0)
    changed = [i for i in range(before.shape[0]) if not torch.equal(inp["state"][i], before[i])]
    assert changed == [3]
