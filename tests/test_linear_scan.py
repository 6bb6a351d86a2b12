import itertools

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
c64, c128 = torch.complex64, torch.complex128

SIZES = [1, 2, 31, 32, 33, 1000, 2047, 2049, 4096, 4097, 100000]
LEADS = [(), (3,), (2, 5)]
DTYPES = [f32, f16, bf16, c64]
# Layouts: contiguous, every other element of a wider buffer, and time-major memory.
LAYOUTS = ["contig", "strided", "tmajor"]


def acc_dtype(dtype):
    return dtype if dtype in (f64, c64, c128) else f32


def wide(dtype):
    return c128 if dtype.is_complex else f64


def lay_out(t, layout):
    """Same values as t in the given memory layout."""
    if layout == "strided":
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout == "tmajor":
        return t.movedim(-1, 0).contiguous().movedim(0, -1)
    return t.contiguous()


def make_inputs(lead, L, dtype, device, init, layout="contig"):
    a, b = testing.make_decays(tuple(lead) + (L,), dtype, device)
    a, b = lay_out(a, layout), lay_out(b, layout)
    h0 = None
    if init:
        h0 = torch.randn(tuple(lead), dtype=wide(dtype), device=device).to(acc_dtype(dtype))
    return a, b, h0


def reference_scan(a, b, h0, reverse, direct_up_to=1000):
    """reference.linear_scan, regrouped for long rows so the float64 loop stays short.

    Up to `direct_up_to` steps it is the reference itself. Longer rows are cut into C chunks of
    T ~ sqrt(L) steps: the reference scans every chunk from zero (all chunks at once, T steps),
    and again with b = 0 from 1 (the running products of a); a loop of C steps over the chunk
    ends gives the state entering each chunk, h = local + product * carry. Same float64 math by
    associativity, about 3 sqrt(L) loop steps instead of L, differentiable by autograd.
    """
    L = a.shape[-1]
    if L <= direct_up_to:
        return reference.linear_scan(a, b, h0, reverse=reverse, return_last_state=True)
    if reverse:
        h, last = reference_scan(a.flip(-1), b.flip(-1), h0, False, direct_up_to)
        return h.flip(-1), last
    T = int(L**0.5) + 1
    C = -(-L // T)
    pad = C * T - L
    a_c = torch.cat([a, a.new_ones(*a.shape[:-1], pad)], -1).reshape(*a.shape[:-1], C, T)
    b_c = torch.cat([b, b.new_zeros(*b.shape[:-1], pad)], -1).reshape(*b.shape[:-1], C, T)
    local = reference.linear_scan(a_c, b_c)  # [..., C, T]
    prod = reference.linear_scan(a_c, torch.zeros_like(b_c), a_c.new_ones(a_c.shape[:-1]))
    carry = h0.to(a.dtype) if h0 is not None else a.new_zeros(a.shape[:-1])
    carries = []
    for c in range(C):
        carries.append(carry)
        carry = prod[..., c, -1] * carry + local[..., c, -1]
    h = (local + prod * torch.stack(carries, -1)[..., None]).reshape(*a.shape[:-1], C * T)[..., :L]
    return h, h[..., -1]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_regrouped_reference_equals_reference(is_complex, reverse):
    a, b, h0 = make_inputs((2, 3), 700, c128 if is_complex else f64, "cpu", True)
    leaves = [[testing.clone_leaf(t) for t in (a, b, h0)] for _ in range(2)]
    want = reference_scan(*leaves[0], reverse)
    got = reference_scan(*leaves[1], reverse, direct_up_to=10)
    g = [torch.randn_like(t) for t in want]
    for x, y in zip(got, want):
        testing.assert_close(x, y, f64)
    for x, y in zip(testing.grads(got, leaves[1], g), testing.grads(want, leaves[0], g)):
        testing.assert_close(x, y, f64)


def check_against_reference(a, b, h0, reverse, dtype):
    """Forward (h, last_state) and the gradients of a, b, initial_state vs the float64 reference."""
    ours_in = [testing.clone_leaf(a), testing.clone_leaf(b), testing.clone_leaf(h0)]
    ref_in = [testing.clone_leaf(t, wide(dtype)) for t in (a, b, h0)]
    h, last = ssm_kernels.linear_scan(*ours_in, reverse=reverse, return_last_state=True)
    with testing.one_thread():
        h_ref, last_ref = reference_scan(*ref_in, reverse)
    assert h.dtype == dtype and h.shape == a.shape
    assert last.dtype == acc_dtype(dtype) and last.shape == a.shape[:-1]
    testing.assert_close(h, h_ref, dtype, "h")
    testing.assert_close(last, last_ref, dtype, "last_state")
    g_h = torch.randn_like(h_ref)
    g_last = torch.randn_like(last_ref)
    got = testing.grads([h, last], ours_in, [g_h.to(dtype), g_last.to(last.dtype)])
    with testing.one_thread():
        want = testing.grads([h_ref, last_ref], ref_in, [g_h, g_last])
    for name, g, w in zip(("a", "b", "initial_state"), got, want):
        if w is None:
            continue
        assert g.dtype == (dtype if name != "initial_state" else acc_dtype(dtype))
        testing.assert_close(g, w, dtype, f"d{name}")


def _cases():
    """A covering design: every size with every dtype; leading shapes, directions, initial states
    and layouts rotate so that each value meets each other often."""
    cases = []
    for i, L in enumerate(SIZES):
        for j, dtype in enumerate(DTYPES):
            # One row at the longest length keeps the float64 reference's autograd quick.
            lead = LEADS[(i + j) % 3] if L < 100000 else ()
            reverse = (i + j) % 2 == 1
            init = (i // 2 + j) % 2 == 0
            layout = LAYOUTS[(i + 2 * j) % 3]
            cases.append((L, lead, dtype, reverse, init, layout))
    # Float64 / complex128 at short and chunked lengths.
    for L, dtype in itertools.product([33, 4097], [f64, c128]):
        cases.append((L, (2,), dtype, L == 33, True, "strided"))
    # Many rows (the row-parallel path) with a partial group of rows and a long row.
    cases.append((33, (67,), f32, False, True, "tmajor"))
    cases.append((4097, (2, 34), bf16, True, True, "contig"))
    cases.append((4097, (65,), c64, False, False, "strided"))
    return cases


CASES = _cases()


def _case_id(case):
    L, lead, dtype, reverse, init, layout = case
    lead_id = "x".join(str(s) for s in lead) or "scalar"
    return f"L{L}-{lead_id}-{testing.dtype_id(dtype)}-{'rev' if reverse else 'fwd'}-{'h0' if init else 'noh0'}-{layout}"


def test_cases_cover_every_value():
    seen = {k: {c[i] for c in CASES} for i, k in enumerate(("L", "lead", "dtype", "reverse", "init", "layout"))}
    assert set(SIZES) <= seen["L"]
    assert set(LEADS) <= seen["lead"]
    assert set(DTYPES) | {f64, c128} <= seen["dtype"]
    assert seen["reverse"] == {False, True} and seen["init"] == {False, True}
    assert set(LAYOUTS) <= seen["layout"]
    for dtype in DTYPES:
        mine = [c for c in CASES if c[2] == dtype]
        assert {c[3] for c in mine} == {False, True}, dtype
        assert {c[4] for c in mine} == {False, True}, dtype
        assert {c[5] for c in mine} == set(LAYOUTS), dtype


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_linear_scan_matches_reference(case, device):
    L, lead, dtype, reverse, init, layout = case
    a, b, h0 = make_inputs(lead, L, dtype, device, init, layout)
    check_against_reference(a, b, h0, reverse, dtype)


@pytest.mark.parametrize("dtype", [f32, c64], ids=testing.dtype_id)
def test_linear_scan_broadcast_a(dtype, device):
    """a expanded along the batch (stride 0), as in S5 where one decay serves every sequence."""
    a, b, h0 = make_inputs((4, 3), 50, dtype, device, True)
    a = a[:1].expand(4, 3, 50)
    check_against_reference(a, b, h0, False, dtype)


def test_linear_scan_default_outputs(device):
    a, b, _ = make_inputs((2,), 7, f32, device, False)
    h = ssm_kernels.linear_scan(a, b)
    assert isinstance(h, torch.Tensor)
    testing.assert_close(h, reference.linear_scan(a.double(), b.double()), f32)


def test_linear_scan_empty_rows(device):
    a = torch.rand(0, 3, 5, device=device)
    h, last = ssm_kernels.linear_scan(a, a.clone(), return_last_state=True)
    assert h.shape == (0, 3, 5) and last.shape == (0, 3)


def test_linear_scan_initial_state_converted(device):
    a, b, h0 = make_inputs((3,), 9, bf16, device, True)
    h = ssm_kernels.linear_scan(a, b, h0.to(f64))
    testing.assert_close(h, reference.linear_scan(a.double(), b.double(), h0.double()), bf16)


def test_linear_scan_gradient_through_last_state_only(device):
    a, b, h0 = make_inputs((2, 3), 40, f32, device, True, "strided")
    ours = [testing.clone_leaf(t) for t in (a, b, h0)]
    ref = [testing.clone_leaf(t, f64) for t in (a, b, h0)]
    _, last = ssm_kernels.linear_scan(*ours, reverse=True, return_last_state=True)
    _, last_ref = reference.linear_scan(*ref, reverse=True, return_last_state=True)
    g = torch.randn_like(last_ref)
    for got, want in zip(testing.grads([last], ours, [g.float()]), testing.grads([last_ref], ref, [g])):
        testing.assert_close(got, want, f32)


@pytest.mark.parametrize("L", [33, 5000], ids=lambda L: f"L{L}")
def test_linear_scan_bitwise_reproducible(L, device):
    """Same bits on every call and for any number of threads (row and chunk modes)."""
    a, b, h0 = make_inputs((3,), L, c64, device, True)
    g = torch.randn(3, L, dtype=c64, device=device)

    def run():
        leaves = [testing.clone_leaf(t) for t in (a, b, h0)]
        h, last = ssm_kernels.linear_scan(*leaves, return_last_state=True)
        da, db, dh0 = torch.autograd.grad([h, last], leaves, [g, torch.ones_like(last)])
        return [t.detach() for t in (h, last, da, db, dh0)]

    testing.assert_deterministic(run)


@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_linear_scan_opcheck(is_complex, device):
    dtype = c64 if is_complex else f32
    a, b, h0 = make_inputs((2, 3), 17, dtype, device, True)
    leaves = [testing.clone_leaf(t) for t in (a, b, h0)]
    testing.run_opcheck(torch.ops.ssm_kernels.linear_scan_fwd, (*leaves, False, None, None))
    testing.run_opcheck(torch.ops.ssm_kernels.linear_scan_fwd, (a, b, None, True, None, None))
    h, _ = torch.ops.ssm_kernels.linear_scan_fwd(a, b, h0, False, None, None)
    testing.run_opcheck(torch.ops.ssm_kernels.linear_scan_bwd, (a, h, h0, torch.randn_like(h), torch.randn_like(h0), False, None, None))
    testing.run_opcheck(torch.ops.ssm_kernels.linear_scan_bwd, (a, h, None, torch.randn_like(h), None, True, None, None))


@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_linear_scan_compile(is_complex, device):
    dtype = c64 if is_complex else f32
    a, b, h0 = make_inputs((2, 3), 40, dtype, device, True)

    def fn(a, b, h0):
        h, last = ssm_kernels.linear_scan(a, b, h0, reverse=True, return_last_state=True)
        return h * 2, last

    testing.check_compile(fn, a, b, h0, dtype=dtype)
    leaves = [testing.clone_leaf(t) for t in (a, b, h0)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    h, last = compiled(*leaves)
    got = torch.autograd.grad([h, last], leaves, [torch.ones_like(h), torch.ones_like(last)])
    leaves2 = [testing.clone_leaf(t) for t in (a, b, h0)]
    h2, last2 = fn(*leaves2)
    want = torch.autograd.grad([h2, last2], leaves2, [torch.ones_like(h2), torch.ones_like(last2)])
    for x, y in zip(got, want):
        testing.assert_close(x, y, dtype)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("is_complex", [False, True], ids=["real", "complex"])
def test_linear_scan_gradcheck(is_complex, reverse, device):
    dtype = c128 if is_complex else f64
    a, b, h0 = make_inputs((2,), 5, dtype, device, True, "strided")

    def fn(a, b, h0):
        return ssm_kernels.linear_scan(a, b, h0, reverse=reverse, return_last_state=True)

    testing.check_gradcheck(fn, [testing.clone_leaf(t) for t in (a, b, h0)])
    testing.check_gradcheck(lambda a, b: ssm_kernels.linear_scan(a, b, reverse=reverse), [testing.clone_leaf(a), testing.clone_leaf(b)])


def test_linear_scan_bad_inputs(device):
    a = torch.rand(2, 3, 10, device=device)
    b = torch.randn(2, 3, 10, device=device)
    h0 = torch.zeros(2, 3, device=device)
    scan = ssm_kernels.linear_scan
    testing.assert_raises_naming(ValueError, "b", scan, a, b[..., :9])
    testing.assert_raises_naming(ValueError, "b", scan, a, b[0])
    testing.assert_raises_naming(TypeError, "b", scan, a, b.to(f16))
    testing.assert_raises_naming(TypeError, "b", scan, a, b.to(c64))
    testing.assert_raises_naming(ValueError, "initial_state", scan, a, b, h0[:1])
    testing.assert_raises_naming(ValueError, "initial_state", scan, a, b, h0[..., None])
    testing.assert_raises_naming(TypeError, "initial_state", scan, a, b, h0.to(c64))
    testing.assert_raises_naming(TypeError, "initial_state", scan, a.to(c64), b.to(c64), h0)
    testing.assert_raises_naming(ValueError, "b", scan, a, b.to("meta"))
    testing.assert_raises_naming(ValueError, "initial_state", scan, a, b, h0.to("meta"))
    testing.assert_raises_naming(TypeError, "a", scan, a.to(torch.int32), b.to(torch.int32))
    testing.assert_raises_naming(TypeError, "a", scan, a.tolist(), b)
    testing.assert_raises_naming(TypeError, "b", scan, a, None)
    testing.assert_raises_naming(ValueError, "a", scan, a[..., :0], b[..., :0])
    testing.assert_raises_naming(ValueError, "a", scan, torch.tensor(1.0, device=device), torch.tensor(1.0, device=device))
    testing.assert_raises_naming(TypeError, "reverse", scan, a, b, None, 1)
    # The C++ driver repeats the checks for direct op calls.
    fwd, bwd = torch.ops.ssm_kernels.linear_scan_fwd, torch.ops.ssm_kernels.linear_scan_bwd
    testing.assert_raises_naming((ValueError, RuntimeError), "b", fwd, a, b[..., :9], None, False, None, None)
    testing.assert_raises_naming((TypeError, RuntimeError), "b", fwd, a, b.double(), None, False, None, None)
    testing.assert_raises_naming((ValueError, RuntimeError), "initial_state", fwd, a, b, h0[:1], False, None, None)
    testing.assert_raises_naming((TypeError, RuntimeError), "initial_state", fwd, a, b, h0.to(c64), False, None, None)
    testing.assert_raises_naming((ValueError, RuntimeError), "a", fwd, a[..., :0], b[..., :0], None, False, None, None)
    testing.assert_raises_naming((ValueError, RuntimeError), "h", bwd, a, b[..., :9], None, b, None, False, None, None)
    testing.assert_raises_naming((ValueError, RuntimeError), "dh", bwd, a, b, None, b[..., :9], None, False, None, None)
    testing.assert_raises_naming((ValueError, RuntimeError), "dlast_state", bwd, a, b, None, b, h0[:1], False, None, None)
