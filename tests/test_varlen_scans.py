"""Packed variable-length sequences (cu_seqlens, seq_idx) in selective_scan, linear_scan,
nn.Mamba and nn.S5: one packed call equals one call per sequence (float64 references)."""
import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing
from ssm_kernels.nn import S5, Mamba
from ssm_kernels.ops.selective_scan import CHUNK_SIZE
from ssm_kernels.testing import (assert_close, assert_grads_close, assert_raises_naming, clone_leaf, dtype_id, make_decays,
                                 make_tensor)

F32, F16, BF16, F64, C64 = torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64

# Lengths with empty sequences (first, middle, last), length 1, and runs of short ones.
SHORT = [0, 1, 5, 0, 37, 2, 1, 1, 20, 0]
# Across the CPU chunk (and CUDA chunk) of both scans, a sequence spanning several chunks.
LONG = [CHUNK_SIZE - 1, 1, CHUNK_SIZE + 1, 0, 3, 2 * CHUNK_SIZE + 5]


offsets = testing.seq_offsets


def spans(cu):
    o = cu.tolist()
    return list(zip(o[:-1], o[1:]))


def wide(t):
    return torch.complex128 if t.is_complex() else torch.float64


def state_dtype(dtype, cplx):
    if cplx:
        return torch.complex128 if dtype == F64 else C64
    return F64 if dtype == F64 else F32


# ----------------------------------------------------------------------------- selective_scan

def ss_inputs(lengths, dtype, cplx=False, bk="var", ck="var", extras=("D", "z", "bias", "softplus", "init"),
              strided=False, dim=3, N=4, groups=1, device="cpu"):
    T = sum(lengths)
    real_w = F64 if dtype == F64 else F32
    mk = lambda shape, dt, **kw: make_tensor(shape, dt, device, strided=strided, **kw)  # noqa: E731
    A_re = -torch.rand(dim, N, device=device, dtype=real_w) * 2 - 0.1
    A = torch.complex(A_re, torch.randn(dim, N, device=device, dtype=real_w) * 3) if cplx else A_re
    wdtype = state_dtype(dtype, cplx)

    def bc(kind):
        if kind == "fixed":
            return make_tensor((dim, N), wdtype, device)
        bdtype = wdtype if cplx else dtype
        return mk((1, N, T), bdtype) if kind == "var" else mk((1, groups, N, T), bdtype)

    inp = {"u": mk((1, dim, T), dtype), "delta": mk((1, dim, T), dtype, low=-1.0, high=1.0), "A": A,
           "B": bc(bk), "C": bc(ck)}
    inp["D"] = torch.randn(dim, device=device, dtype=real_w) if "D" in extras else None
    inp["z"] = mk((1, dim, T), dtype) if "z" in extras else None
    inp["delta_bias"] = torch.rand(dim, device=device, dtype=real_w) - 0.5 if "bias" in extras else None
    inp["delta_softplus"] = "softplus" in extras
    inp["initial_state"] = make_tensor((len(lengths), dim, N), wdtype, device) if "init" in extras else None
    return inp


SS_DIFF = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def ss_per_sequence(inp, cu, fn):
    """fn (the float64 reference or the op) on each sequence: out [1, D, T], last [S, D, N]."""
    outs, lasts = [], []
    dim, N = inp["A"].shape
    for s, (t0, t1) in enumerate(spans(cu)):
        init = inp["initial_state"]
        if t1 == t0:
            wd = state_dtype(F64 if fn is reference.selective_scan else inp["u"].dtype, inp["A"].is_complex())
            last = init[s].to(wd) if init is not None else torch.zeros(dim, N, dtype=wd, device=inp["u"].device)
            lasts.append(last)
            continue
        seq = {k: (v[..., t0:t1] if k in ("u", "delta", "z") and v is not None else v) for k, v in inp.items()}
        for k in ("B", "C"):
            if seq[k].dim() > 2:
                seq[k] = seq[k][..., t0:t1]
        seq["initial_state"] = None if init is None else init[s:s + 1]
        out, last = fn(**seq, return_last_state=True)
        outs.append(out)
        lasts.append(last[0])
    return torch.cat(outs, dim=-1), torch.stack(lasts)


def ss_run(inp, cu, fn, seed=1, packed=True):
    """Forward and gradients (same output gradients) of the packed op, or of fn per sequence."""
    to64 = fn is reference.selective_scan
    ins = {k: (clone_leaf(v, wide(v) if to64 else None) if (k in SS_DIFF and v is not None) else v)
           for k, v in inp.items()}
    if packed:
        out, last = ssm_kernels.selective_scan(**ins, return_last_state=True, cu_seqlens=cu)
    else:
        out, last = ss_per_sequence(ins, cu.cpu(), fn)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    g_last = torch.randn(last.shape, generator=gen, dtype=wide(last)).to(last.device, last.dtype)
    names = [k for k in SS_DIFF if inp.get(k) is not None]
    g = testing.grads([out, last], [ins[k] for k in names], [g_out, g_last])
    return out, last, dict(zip(names, g))


SS_CASES = [
    # (lengths, dtype, complex A, B kind, C kind, strided)
    (SHORT, F32, False, "var", "var", False),
    (SHORT, F16, False, "grp", "fixed", True),
    (SHORT, BF16, True, "fixed", "var", False),
    (SHORT, F64, False, "var", "grp", False),
    (SHORT, F32, True, "var", "var", True),
    ([7], F32, False, "var", "var", False),
    ([0, 0, 3, 0], F32, False, "fixed", "fixed", False),
]


@pytest.mark.parametrize("case", SS_CASES, ids=lambda c: f"S{len(c[0])}-{dtype_id(c[1])}-{'cplx' if c[2] else 'real'}"
                         f"-B{c[3]}-C{c[4]}" + ("-strided" if c[5] else ""))
def test_selective_scan_packed_matches_reference(case, device):
    lengths, dtype, cplx, bk, ck, strided = case
    inp = ss_inputs(lengths, dtype, cplx, bk, ck, strided=strided, groups=3, device=device)
    cu = offsets(lengths, device=device)
    out, last, g = ss_run(inp, cu, None)
    rout, rlast, rg = ss_run(inp, cu, reference.selective_scan, packed=False)
    assert last.shape == (len(lengths), 3, 4) and last.dtype == state_dtype(dtype, cplx)
    assert_close(out, rout, dtype, "out")
    assert_close(last, rlast, dtype, "last_state")
    assert_grads_close(g, rg, inp, dtype)


def test_selective_scan_packed_long_sequences_across_chunks(device):
    # Long sequences: the op per sequence (itself checked against the reference at these
    # lengths in test_selective_scan.py) in float64 is the reference.
    inp = ss_inputs(LONG, F64, dim=2, N=3, device=device)
    cu = offsets(LONG, device, torch.int64)
    out, last, g = ss_run(inp, cu, None)
    rout, rlast, rg = ss_run(inp, cu, ssm_kernels.selective_scan, packed=False)
    assert_close(out, rout, F64, "out")
    assert_close(last, rlast, F64, "last_state")
    for name in g:
        assert_close(g[name], rg[name], F64, f"d{name}")
    inp32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.dtype == F64 else v) for k, v in inp.items()}
    out32, last32, g32 = ss_run(inp32, cu, None)
    assert_close(out32, rout, F32, "out f32")
    assert_close(last32, rlast, F32, "last_state f32")
    for name in g32:
        assert_close(g32[name], rg[name], F32, f"d{name} f32")


def test_selective_scan_seq_idx_restarts_from_zero(device):
    # Two rows, different boundaries; the row's states belong to its first / last sequence.
    L = 40
    inp = ss_inputs([L, L], F32, device=device)
    inp = {k: v for k, v in inp.items()}
    for k in ("u", "delta", "z"):
        inp[k] = make_tensor((2, 3, L), F32, device, low=-1.0 if k == "delta" else None,
                             high=1.0 if k == "delta" else None)
    for k in ("B", "C"):
        inp[k] = make_tensor((2, 4, L), F32, device)
    inp["initial_state"] = make_tensor((2, 3, 4), F32, device)
    seq_idx = torch.tensor([[0] * 10 + [1] * 1 + [2] * 29, [3] * 25 + [7] * 15], dtype=torch.int32, device=device)
    out, last = ssm_kernels.selective_scan(**inp, return_last_state=True, seq_idx=seq_idx)
    for b, bounds in enumerate([[0, 10, 11, 40], [0, 25, 40]]):
        for i, (t0, t1) in enumerate(zip(bounds[:-1], bounds[1:])):
            seq = {k: (v[b:b + 1, ..., t0:t1] if k in ("u", "delta", "z", "B", "C") else v) for k, v in inp.items()}
            seq["initial_state"] = inp["initial_state"][b:b + 1] if i == 0 else None
            r, rl = reference.selective_scan(**seq, return_last_state=True)
            assert_close(out[b:b + 1, :, t0:t1], r, F32, f"out row {b} seq {i}")
        assert_close(last[b], rl[0], F32, f"last_state row {b}")
    # Backward against the op per run (forward just checked).
    ins = {k: (clone_leaf(v) if k in SS_DIFF and v is not None else v) for k, v in inp.items()}
    out, last = ssm_kernels.selective_scan(**ins, return_last_state=True, seq_idx=seq_idx)
    g = torch.autograd.grad((out.square().sum() + last.square().sum()), [ins["u"], ins["initial_state"]])
    ref = {k: (clone_leaf(v, F64) if k in SS_DIFF and v is not None else v) for k, v in inp.items()}
    total = 0
    for b, bounds in enumerate([[0, 10, 11, 40], [0, 25, 40]]):
        for i, (t0, t1) in enumerate(zip(bounds[:-1], bounds[1:])):
            seq = {k: (v[b:b + 1, ..., t0:t1] if k in ("u", "delta", "z", "B", "C") else v) for k, v in ref.items()}
            seq["initial_state"] = ref["initial_state"][b:b + 1] if i == 0 else None
            r, rl = reference.selective_scan(**seq, return_last_state=True)
            total = total + r.square().sum() + (rl.square().sum() if t1 == 40 else 0)
    rg = torch.autograd.grad(total, [ref["u"], ref["initial_state"]])
    assert_close(g[0], rg[0], F32, "du")
    assert_close(g[1], rg[1], F32, "dinitial_state")


def test_selective_scan_packed_no_leakage_and_deterministic(device):
    lengths = [30, 1, 0, 2100, 17]
    inp = ss_inputs(lengths, F32, bk="grp", ck="var", groups=3, dim=6, device=device)
    cu = offsets(lengths, device=device)
    testing.assert_deterministic(lambda: (lambda out, last, g: [out, last, *g.values()])(*ss_run(inp, cu, None)))
    out, last, g = ss_run(inp, cu, None)
    # Perturb sequence 3 (tokens 31..2131) and its initial state: nothing else moves.
    t0, t1 = 31, 2131
    pert = dict(inp)
    for k in ("u", "delta", "z"):
        v = inp[k].clone()
        v[..., t0:t1] += 0.5
        pert[k] = v
    pert["initial_state"] = inp["initial_state"].clone()
    pert["initial_state"][3] += 1.0
    pout, plast, _ = ss_run(pert, cu, None)
    assert torch.equal(pout[..., :t0], out[..., :t0]) and torch.equal(pout[..., t1:], out[..., t1:])
    keep = [0, 1, 2, 4]
    assert torch.equal(plast[keep], last[keep])
    assert not torch.equal(pout[..., t0:t1], out[..., t0:t1])


def test_selective_scan_decode_continues_packed_prefill(device):
    # Per-sequence states of a packed prefill feed selective_state_update through
    # state_batch_indices; the step equals the per-sequence scan one token longer.
    lengths = [5, 0, 9, 1]
    dim, N = 3, 4
    inp = ss_inputs([n + 1 for n in lengths], F32, extras=("D", "bias", "softplus", "init"), device=device)
    full_cu = offsets([n + 1 for n in lengths], device=device)
    last_tok = [t1 - 1 for _, t1 in spans(full_cu.cpu())]
    keep = torch.ones(inp["u"].shape[-1], dtype=torch.bool)
    keep[last_tok] = False
    pre = {k: (v[..., keep] if k in ("u", "delta", "B", "C") and v is not None else v) for k, v in inp.items()}
    _, states = ssm_kernels.selective_scan(**pre, return_last_state=True, cu_seqlens=offsets(lengths, device=device))
    order = torch.tensor([2, 0, 3, 1], dtype=torch.int64, device=device)  # decode rows -> sequences
    tok = torch.tensor(last_tok, device=device)[order]
    x, dt = inp["u"][0, :, tok].T, inp["delta"][0, :, tok].T  # [S, D]
    B, C = inp["B"][0, :, tok].T.contiguous(), inp["C"][0, :, tok].T.contiguous()  # [S, N]
    out = ssm_kernels.selective_state_update(states, x, dt, inp["A"], B, C, D=inp["D"], dt_bias=inp["delta_bias"],
                                             dt_softplus=True, state_batch_indices=order)
    ref_out, ref_last = ssm_kernels.selective_scan(**inp, return_last_state=True, cu_seqlens=full_cu)
    assert_close(out, ref_out[0, :, tok].T, F32, "decode out")
    assert_close(states, ref_last, F32, "decoded states")


def test_selective_scan_packed_opcheck_and_compile(device):
    lengths = [3, 0, 6]
    inp = ss_inputs(lengths, F32, device=device)
    cu = offsets(lengths, device=device)
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["delta_bias"], True,
            inp["initial_state"], cu, None)
    testing.run_opcheck(torch.ops.ssm_kernels.selective_scan_fwd.default, args)

    def fn(u, delta, B, C, z, init, cu_seqlens):
        out, last = ssm_kernels.selective_scan(u, delta, inp["A"], B, C, D=inp["D"], z=z, delta_bias=inp["delta_bias"],
                                               delta_softplus=True, initial_state=init, return_last_state=True,
                                               cu_seqlens=cu_seqlens)
        return out, last

    check_no_recompile(fn, lambda c: (inp["u"], inp["delta"], inp["B"], inp["C"], inp["z"], inp["initial_state"], c),
                       [cu, offsets([0, 9, 0], device=device), offsets([1, 1, 7], device=device)])


def check_no_recompile(fn, make_args, cus):
    """torch.compile(fullgraph=True) of fn agrees with eager for every cu_seqlens, and new lengths
    (same number of sequences) do not recompile."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        for cu in cus:
            got, want = compiled(*make_args(cu)), fn(*make_args(cu))
            for i, (a, b) in enumerate(zip(got, want)):
                assert_close(a, b, F32, f"compiled output {i}")


def test_selective_scan_packed_bad_input(device):
    inp = ss_inputs([3, 4], F32, device=device)
    call = lambda **kw: ssm_kernels.selective_scan(**{**inp, **kw})  # noqa: E731
    check_bad_packing(call, inp["u"], 7, device)
    assert_raises_naming(ValueError, "initial_state", call, cu_seqlens=offsets([7], device=device))


def check_bad_packing(call, x, seqlen, device):
    """The checks shared by both ops: call(**kw) with x [1, ..., seqlen] inputs."""
    cu = lambda v, dt=torch.int32: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu([1, 3, seqlen]))
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu([0, 5, 3, seqlen]))
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu([0, 3, seqlen - 1]))
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu([0, 3, seqlen + 1]))
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu([0, 3, seqlen]).to("meta"))
    assert_raises_naming((TypeError, ValueError), "cu_seqlens", call, cu_seqlens=cu([0, 3, seqlen]).float())
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu([[0, 3, seqlen]]))
    seq_idx = torch.zeros(1, seqlen, dtype=torch.int32, device=device)
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu([0, 3, seqlen]), seq_idx=seq_idx)
    bad = seq_idx.clone()
    bad[0, 2] = 1
    assert_raises_naming(ValueError, "seq_idx", call, seq_idx=bad)
    assert_raises_naming((TypeError, ValueError), "seq_idx", call, seq_idx=seq_idx.long())
    assert_raises_naming(ValueError, "seq_idx", call, seq_idx=seq_idx[:, :-1])


def test_selective_scan_packed_batch_above_one_raises(device):
    u = make_tensor((2, 3, 5), F32, device)
    B = make_tensor((2, 4, 5), F32, device)
    assert_raises_naming(ValueError, "cu_seqlens", ssm_kernels.selective_scan, u, u.abs(), -torch.rand(3, 4, device=device),
                         B, B, cu_seqlens=offsets([2, 3], device=device))


# ----------------------------------------------------------------------------- linear_scan

def ls_inputs(lead, T, dtype, layout="contig", device="cpu", S=None):
    a, b = make_decays((1, *lead, T), dtype, device)
    if layout == "strided":
        a = torch.stack([a, a], -1).flatten(-2)[..., ::2]
        b = torch.stack([b, b], -1).flatten(-2)[..., ::2]
    elif layout == "tmajor":
        a, b = (t.movedim(-1, 0).contiguous().movedim(0, -1) for t in (a, b))
    acc = dtype if dtype in (F64, C64) else F32
    h0 = torch.randn((S, *lead), dtype=acc, device=device) if S is not None else None
    return a, b, h0


def ls_per_sequence(a, b, h0, cu, reverse, fn):
    hs, lasts = [], []
    for s, (t0, t1) in enumerate(spans(cu)):
        init = None if h0 is None else h0[s:s + 1]
        if t1 == t0:
            wd = wide(a) if fn is reference.linear_scan else (a.dtype if a.dtype in (F64, C64) else F32)
            lasts.append(init[0].to(wd) if init is not None else torch.zeros(a.shape[1:-1], dtype=wd, device=a.device))
            continue
        h, last = fn(a[..., t0:t1], b[..., t0:t1], init, reverse=reverse, return_last_state=True)
        hs.append(h)
        lasts.append(last[0])
    return torch.cat(hs, -1), torch.stack(lasts)


def ls_run(a, b, h0, cu, reverse, fn=None, seed=1):
    to64 = fn is reference.linear_scan
    ins = [clone_leaf(t, wide(t) if to64 else None) for t in (a, b, h0)]
    if fn is None:
        h, last = ssm_kernels.linear_scan(*ins, reverse=reverse, return_last_state=True, cu_seqlens=cu)
    else:
        h, last = ls_per_sequence(*ins, cu.cpu(), reverse, fn)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g_h = torch.randn(h.shape, generator=gen, dtype=wide(h)).to(h.device, h.dtype)
    g_last = torch.randn(last.shape, generator=gen, dtype=wide(last)).to(last.device, last.dtype)
    g = testing.grads([h, last], ins, [g_h, g_last])
    return h, last, g


LS_CASES = [
    # (lengths, lead, dtype, layout, reverse)
    (SHORT, (3,), F32, "contig", False),
    (SHORT, (2, 3), F16, "strided", True),
    (SHORT, (5,), BF16, "tmajor", False),
    (SHORT, (), F64, "contig", True),
    (SHORT, (3,), C64, "strided", False),
    (SHORT, (9,), F32, "contig", True),  # a full group of rows and a short one
    ([0, 0, 4, 0], (4,), F32, "contig", False),
]


@pytest.mark.parametrize("case", LS_CASES, ids=lambda c: f"lead{len(c[1])}-{dtype_id(c[2])}-{c[3]}"
                         + ("-rev" if c[4] else "") + f"-S{len(c[0])}")
def test_linear_scan_packed_matches_reference(case, device):
    lengths, lead, dtype, layout, reverse = case
    a, b, h0 = ls_inputs(lead, sum(lengths), dtype, layout, device, S=len(lengths))
    cu = offsets(lengths, device=device)
    h, last, g = ls_run(a, b, h0, cu, reverse)
    rh, rlast, rg = ls_run(a, b, h0, cu, reverse, reference.linear_scan)
    assert last.shape == (len(lengths), *lead)
    assert_close(h, rh, dtype, "h")
    assert_close(last, rlast, dtype, "last_state")
    for name, x, gx, rgx in zip(("a", "b", "initial_state"), (a, b, h0), g, rg):
        assert gx.shape == x.shape and gx.dtype == x.dtype, name
        assert_close(gx, rgx, dtype, f"d{name}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_linear_scan_packed_long_sequences(reverse, device):
    a, b, h0 = ls_inputs((2,), sum(LONG), F32, "contig", device, S=len(LONG))
    cu = offsets(LONG, device, torch.int64)
    h, last, g = ls_run(a, b, h0, cu, reverse)
    rh, rlast, rg = ls_run(a, b, h0, cu, reverse, reference.linear_scan)
    assert_close(h, rh, F32, "h")
    assert_close(last, rlast, F32, "last_state")
    for name, gx, rgx in zip(("a", "b", "initial_state"), g, rg):
        assert_close(gx, rgx, F32, f"d{name}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_linear_scan_seq_idx(reverse, device):
    L = 30
    a, b, _ = ls_inputs((3,), L, F32, "contig", device)
    a, b = torch.cat([a, a.flip(-1)]), torch.cat([b, b.flip(-1)])  # [2, 3, L]
    h0 = torch.randn(2, 3, device=device)
    seq_idx = torch.tensor([[0] * 7 + [1] + [4] * 22, [2] * 30], dtype=torch.int32, device=device)
    ins = [clone_leaf(t) for t in (a, b, h0)]
    h, last = ssm_kernels.linear_scan(*ins, reverse=reverse, return_last_state=True, seq_idx=seq_idx)
    (h.square().sum() + last.square().sum()).backward()
    ref = [clone_leaf(t, F64) for t in (a, b, h0)]
    total = 0
    for row, bounds in enumerate([[0, 7, 8, 30], [0, 30]]):
        runs = list(zip(bounds[:-1], bounds[1:]))
        for i, (t0, t1) in enumerate(runs):
            first = (i == len(runs) - 1) if reverse else (i == 0)
            init = ref[2][row:row + 1] if first else None
            rh, rl = reference.linear_scan(ref[0][row:row + 1, :, t0:t1], ref[1][row:row + 1, :, t0:t1], init,
                                           reverse=reverse, return_last_state=True)
            assert_close(h[row:row + 1, :, t0:t1], rh, F32, f"h row {row} run {i}")
            total = total + rh.square().sum()
            if (i == 0) if reverse else (i == len(runs) - 1):
                assert_close(last[row], rl[0], F32, f"last_state row {row}")
                total = total + rl.square().sum()
    total.backward()
    for name, x, r in zip(("a", "b", "initial_state"), ins, ref):
        assert_close(x.grad, r.grad, F32, f"d{name}")


def test_linear_scan_packed_no_leakage_and_deterministic(device):
    lengths = [40, 0, 2500, 1, 9]
    a, b, h0 = ls_inputs((6,), sum(lengths), F32, "contig", device, S=len(lengths))
    cu = offsets(lengths, device=device)
    h, last, g = ls_run(a, b, h0, cu, False)
    h2, last2, g2 = ls_run(a, b, h0, cu, False)
    assert torch.equal(h, h2) and torch.equal(last, last2)
    assert all(torch.equal(x, y) for x, y in zip(g, g2)), "gradients not bitwise reproducible"
    t0, t1 = 40, 2540
    a2, b2, h02 = a.clone(), b.clone(), h0.clone()
    a2[..., t0:t1] *= 0.5
    b2[..., t0:t1] += 1.0
    h02[2] += 1.0
    ph, plast, pg = ls_run(a2, b2, h02, cu, False)
    assert torch.equal(ph[..., :t0], h[..., :t0]) and torch.equal(ph[..., t1:], h[..., t1:])
    keep = [0, 1, 3, 4]
    assert torch.equal(plast[keep], last[keep])
    # The gradients of the other sequences' inputs do not move either.
    for x, y in zip(pg[:2], g[:2]):
        assert torch.equal(x[..., :t0], y[..., :t0]) and torch.equal(x[..., t1:], y[..., t1:])
    assert torch.equal(pg[2][keep], g[2][keep])


def test_linear_scan_packed_opcheck_and_compile(device):
    lengths = [3, 0, 6]
    a, b, h0 = ls_inputs((2,), 9, F32, "contig", device, S=3)
    cu = offsets(lengths, device=device)
    testing.run_opcheck(torch.ops.ssm_kernels.linear_scan_fwd.default, (a, b, h0, False, cu, None))

    def fn(a, b, h0, cu_seqlens):
        return ssm_kernels.linear_scan(a, b, h0, return_last_state=True, cu_seqlens=cu_seqlens)

    check_no_recompile(fn, lambda c: (a, b, h0, c),
                       [cu, offsets([9, 0, 0], device=device), offsets([2, 2, 5], device=device)])


def test_linear_scan_packed_bad_input(device):
    a, b, h0 = ls_inputs((3,), 7, F32, "contig", device, S=2)
    call = lambda **kw: ssm_kernels.linear_scan(**{"a": a, "b": b, **kw})  # noqa: E731
    check_bad_packing(call, a, 7, device)
    assert_raises_naming(ValueError, "initial_state", call, initial_state=h0, cu_seqlens=offsets([7], device=device))
    assert_raises_naming(ValueError, "cu_seqlens", ssm_kernels.linear_scan, a.expand(2, 3, 7), b.expand(2, 3, 7),
                         cu_seqlens=offsets([3, 4], device=device))
    assert_raises_naming(ValueError, "cu_seqlens", ssm_kernels.linear_scan, a[0, 0], b[0, 0],
                         cu_seqlens=offsets([3, 4], device=device))


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("with_conv_state", [False, True], ids=["conv0", "conv-state"])
def test_mamba_packed_equals_separate_calls(with_conv_state, device):
    torch.manual_seed(0)
    layer = Mamba(d_model=16, d_state=4, d_conv=4, expand=2).to(device)
    lengths = [5, 0, 1, 12, 3]
    seqs = [torch.randn(1, n, 16, device=device) for n in lengths]
    ssm0 = torch.randn(len(lengths), layer.d_inner, 4, device=device)
    # per-sequence conv states (zeros: none given)
    conv0 = torch.randn(len(lengths), layer.d_inner, 4, device=device) if with_conv_state else None
    x = torch.cat(seqs, dim=1).requires_grad_(True)
    s0 = ssm0.clone().requires_grad_(True)
    c0 = conv0.clone().requires_grad_(True) if with_conv_state else None
    cu = offsets(lengths, device=device)
    out, conv, ssm = layer(x, conv_state=c0, ssm_state=s0, return_final_states=True, cu_seqlens=cu)
    g_out, g_conv, g_ssm = torch.randn_like(out), torch.randn_like(conv), torch.randn_like(ssm)
    leaves = [x, s0] + ([c0] if with_conv_state else [])
    grads = torch.autograd.grad((out * g_out).sum() + (conv * g_conv).sum() + (ssm * g_ssm).sum(),
                                leaves + list(layer.parameters()))
    xs = [s.clone().requires_grad_(True) for s in seqs]
    s0s = ssm0.clone().requires_grad_(True)
    c0s = conv0.clone().requires_grad_(True) if with_conv_state else torch.zeros(len(lengths), layer.d_inner, 4,
                                                                                   device=device)
    total, outs = 0, []
    for i, (n, xi) in enumerate(zip(lengths, xs)):
        t0 = sum(lengths[:i])
        if n == 0:
            total = total + (s0s[i] * g_ssm[i]).sum() + (c0s[i] * g_conv[i]).sum()
            assert torch.equal(conv[i], c0s[i].detach())
            assert_close(ssm[i], ssm0[i], F32, "empty sequence's ssm_state")
            continue
        o, c, s = layer(xi, conv_state=c0s[i:i + 1], ssm_state=s0s[i:i + 1], return_final_states=True)
        outs.append(o)
        assert_close(out[:, t0:t0 + n], o, F32, f"out of sequence {i}")
        assert_close(conv[i], c[0], F32, f"conv_state of sequence {i}")
        assert_close(ssm[i], s[0], F32, f"ssm_state of sequence {i}")
        total = total + (o * g_out[:, t0:t0 + n]).sum() + (c[0] * g_conv[i]).sum() + (s[0] * g_ssm[i]).sum()
    ref_leaves = [*xs, s0s] + ([c0s] if with_conv_state else [])
    ref = torch.autograd.grad(total, ref_leaves + list(layer.parameters()), allow_unused=True)
    dx = [r if r is not None else torch.zeros_like(xi) for r, xi in zip(ref[:len(xs)], xs)]  # empty: unused
    assert_close(grads[0], torch.cat(dx, dim=1), F32, "grad hidden_states")
    assert_close(grads[1], ref[len(xs)], F32, "grad ssm_state")
    if with_conv_state:
        assert_close(grads[2], ref[len(xs) + 1], F32, "grad conv_state")
    for (name, _), g, r in zip(layer.named_parameters(), grads[len(leaves):], ref[len(ref_leaves):]):
        assert_close(g, r, F32, f"grad {name}")
    # The per-sequence states continue decoding like a batch of separate caches.
    step_in = torch.randn(len(lengths), 1, 16, device=device)
    conv_c, ssm_c = conv.detach().clone(), ssm.detach().clone()
    y, _, _ = layer.step(step_in, conv_c, ssm_c)
    for i, xi in enumerate(seqs):
        if lengths[i] == 0:
            continue
        full = layer(torch.cat([xi, step_in[i:i + 1]], dim=1), ssm_state=ssm0[i:i + 1],
                     conv_state=c0s[i:i + 1].detach())
        assert_close(y[i], full[0, -1:], F32, f"decode step of sequence {i}")


def test_mamba_packed_bad_input(device):
    layer = Mamba(d_model=8, d_state=4).to(device)
    x = torch.randn(2, 6, 8, device=device)
    cu = offsets([2, 4], device=device)
    assert_raises_naming(ValueError, "cu_seqlens", layer, x, cu_seqlens=cu)
    assert_raises_naming(ValueError, "ssm_state", layer, x[:1], cu_seqlens=cu,
                         ssm_state=torch.zeros(1, layer.d_inner, 4, device=device))
    assert_raises_naming(ValueError, "conv_state", layer, x[:1], cu_seqlens=cu,
                         conv_state=torch.zeros(3, layer.d_inner, 4, device=device))


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_s5_packed_equals_separate_calls(bidirectional, device):
    torch.manual_seed(0)
    layer = S5(d_model=8, state_dim=16, bidirectional=bidirectional).to(device)
    lengths = [4, 0, 1, 9]
    seqs = [torch.randn(1, n, 8, device=device) for n in lengths]
    h0 = torch.randn(len(lengths), 8, dtype=C64, device=device)
    x = torch.cat(seqs, dim=1).requires_grad_(True)
    y, last = layer(x, h0, return_last_state=True, cu_seqlens=offsets(lengths, device=device))
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum() + last.abs().square().sum(), [x] + list(layer.parameters()))
    xs = [s.clone().requires_grad_(True) for s in seqs]
    total = 0
    for i, n in enumerate(lengths):
        t0 = sum(lengths[:i])
        if n == 0:
            assert_close(last[i], h0[i], C64, "empty sequence's state")
            total = total + h0[i].abs().square().sum()
            continue
        yi, li = layer(xs[i], h0[i:i + 1], return_last_state=True)
        assert_close(y[:, t0:t0 + n], yi, F32, f"y of sequence {i}")
        assert_close(last[i], li[0], C64, f"state of sequence {i}")
        total = total + (yi * g[:, t0:t0 + n]).sum() + li.abs().square().sum()
    ref = torch.autograd.grad(total, xs + list(layer.parameters()), allow_unused=True)
    dx = [r if r is not None else torch.zeros_like(xi) for r, xi in zip(ref[:len(xs)], xs)]  # empty: unused
    assert_close(grads[0], torch.cat(dx, dim=1), F32, "grad u")
    for (name, _), gp, r in zip(layer.named_parameters(), grads[1:], ref[len(xs):]):
        assert_close(gp, r, F32, f"grad {name}")
