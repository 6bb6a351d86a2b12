"""log_vandermonde / log_vandermonde_transpose (S4D kernels) against the float64 references."""
import math

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing

c64, c128 = torch.complex64, torch.complex128
REAL_OF = {c64: torch.float32, c128: torch.float64}


def s4d_nodes(shape, dtype, device, dt_max=0.1, strided=False):
    """x = dt * A with S4D-Lin's A_n = -1/2 + i pi n and dt log-uniform in [1e-3, dt_max]."""
    N = shape[-1]
    dt = torch.exp(torch.empty(shape[:-1] + (1,), dtype=torch.float64).uniform_(math.log(1e-3), math.log(dt_max)))
    A = torch.complex(-0.5 * torch.ones(N, dtype=torch.float64), math.pi * torch.arange(N, dtype=torch.float64))
    x = (dt * A).expand(shape).to(dtype).to(device)
    if strided:
        x = torch.stack([x, torch.zeros_like(x)], dim=-1)[..., 0]
    return x


# Covering design over N, L, batch shape, broadcast, dtype, symmetric and strides. complex128
# cases keep |Im x| * L below about 1e5: beyond that the float64 reference itself rounds
# x * l (relative error |Im x| l 1e-16) more than the 1e-10 tolerance allows.
CASES = [
    # N, L, batch, bcast, dtype, symmetric, strided, dt_max
    (1, 65536, (), "none", c64, True, False, 0.1),
    (3, 65536, (3, 5), "mixed", c128, True, True, 0.01),
    (3, 1000, (7,), "none", c128, False, False, 0.1),
    (32, 4096, (3, 5), "v-bcast", c64, True, True, 0.1),
    (32, 1, (7,), "x-bcast", c128, False, False, 0.1),
    (64, 4096, (7,), "mixed", c64, False, False, 0.1),
    (64, 2, (3, 5), "none", c128, True, False, 0.1),
    (100, 1000, (3, 5), "none", c64, False, True, 0.1),
    (100, 4096, (7,), "v-bcast", c128, True, False, 0.002),
    (256, 1000, (), "none", c128, True, False, 0.01),
    (64, 65536, (), "none", c64, False, False, 0.1),
    (1024, 2, (7,), "x-bcast", c64, True, False, 0.1),
    (1024, 4096, (), "none", c64, True, True, 0.1),
    (2048, 1000, (), "none", c64, False, False, 0.1),
    (2048, 1, (3, 5), "mixed", c128, True, False, 0.1),
]


def case_id(c):
    return testing.broadcast_case_id(*c[:7])


def make_vx(N, batch, bcast, dtype, strided, dt_max, device):
    v_shape, x_shape = testing.broadcast_pair_shapes(batch, bcast, N)
    v = testing.make_tensor(v_shape, dtype, device, strided=strided)
    x = s4d_nodes(x_shape, dtype, device, dt_max, strided=strided)
    return v, x


def check_grads(ours_fn, ref_fn, inputs, dtype, names):
    ours_in = [testing.clone_leaf(t) for t in inputs]
    ref_in = [testing.clone_leaf(t, c128 if t.is_complex() else torch.float64) for t in inputs]
    y = ours_fn(*ours_in)
    y_ref = ref_fn(*ref_in)
    assert y.shape == y_ref.shape
    assert y.dtype == (y_ref.dtype if dtype == c128 else {torch.float64: torch.float32, c128: c64}[y_ref.dtype])
    testing.assert_close(y, y_ref, dtype, "out")
    g = torch.randn_like(y_ref)
    got = testing.grads([y], ours_in, [g.to(y.dtype)])
    want = testing.grads([y_ref], ref_in, [g])
    for name, a, b, t in zip(names, got, want, inputs):
        assert a.shape == t.shape and a.dtype == t.dtype, name
        testing.assert_close(a, b, dtype, "d" + name)


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_log_vandermonde_matches_reference(case, device):
    N, L, batch, bcast, dtype, sym, strided, dt_max = case
    v, x = make_vx(N, batch, bcast, dtype, strided, dt_max, device)
    check_grads(lambda v, x: ssm_kernels.log_vandermonde(v, x, L, sym),
                lambda v, x: reference.log_vandermonde(v, x, L, sym), [v, x], dtype, ["v", "x"])


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_log_vandermonde_transpose_matches_reference(case, device):
    # Here `symmetric` picks a real u (True) or a complex u (False); u broadcasts over the
    # leading axis when there is one.
    N, L, batch, bcast, dtype, real_u, strided, dt_max = case
    v, x = make_vx(N, batch, bcast, dtype, strided, dt_max, device)
    u_batch = (1,) + tuple(batch[1:]) if batch else ()
    u = testing.make_tensor((*u_batch, L), REAL_OF[dtype] if real_u else dtype, device, strided=strided)
    check_grads(lambda u, v, x: ssm_kernels.log_vandermonde_transpose(u, v, x, L),
                lambda u, v, x: reference.log_vandermonde_transpose(u, v, x, L), [u, v, x], dtype,
                ["u", "v", "x"])


@pytest.mark.parametrize("L", [80, 65536])
def test_vandermonde_complex64_long_and_fast_phases(L, device):
    """complex64 within 1e-5 of the float64 reference for |Re x| <= 1 and Im x in [-pi L, pi L].

    At L = 80 Re x spans [-1, 1] (e^80 still fits float32); at L = 65536 Re x in [-1, 0), log-
    uniform in magnitude down to 1e-6 so that many terms survive to the end of the kernel.
    """
    N = 16
    im = (torch.rand(3, N, dtype=torch.float64) * 2 - 1) * math.pi * L
    if L <= 80:
        re = torch.rand(3, N, dtype=torch.float64) * 2 - 1
    else:
        re = -torch.exp(torch.empty(3, N, dtype=torch.float64).uniform_(math.log(1e-6), 0.0))
    x = torch.complex(re, im).to(c64).to(device)
    v = testing.make_tensor((3, N), c64, device)
    u = testing.make_tensor((3, L), c64, device)
    x64, v64 = x.to(c128), v.to(c128)
    for sym in (True, False):
        testing.assert_close(ssm_kernels.log_vandermonde(v, x, L, sym),
                             reference.log_vandermonde(v64, x64, L, sym), c64, "y", tol=1e-5)
    testing.assert_close(ssm_kernels.log_vandermonde_transpose(u, v, x, L),
                         reference.log_vandermonde_transpose(u.to(c128), v64, x64, L), c64, "out",
                         tol=1e-5)


def test_vandermonde_strided_equals_contiguous(device):
    v = testing.make_tensor((6, 40), c64, device, strided=True)
    x = s4d_nodes((6, 40), c64, device, strided=True)
    u = testing.make_tensor((6, 300), c64, device, strided=True)
    assert not (v.is_contiguous() or x.is_contiguous() or u.is_contiguous())
    assert torch.equal(ssm_kernels.log_vandermonde(v, x, 300),
                       ssm_kernels.log_vandermonde(v.contiguous(), x.contiguous(), 300))
    assert torch.equal(ssm_kernels.log_vandermonde_transpose(u, v, x, 300),
                       ssm_kernels.log_vandermonde_transpose(u.contiguous(), v.contiguous(), x.contiguous(), 300))


def test_vandermonde_backward_bitwise_reproducible(device):
    v = testing.make_tensor((7, 96), c64, device)
    x = s4d_nodes((7, 96), c64, device)
    u = testing.make_tensor((7, 3000), torch.float32, device)  # three tiles

    def run():
        vl, xl, ul = testing.clone_leaf(v), testing.clone_leaf(x), testing.clone_leaf(u)
        y = ssm_kernels.log_vandermonde(vl, xl, 3000)
        out = ssm_kernels.log_vandermonde_transpose(ul, vl, xl, 3000)
        return torch.autograd.grad((y.sum() + out.abs().sum()), (ul, vl, xl))

    testing.assert_deterministic(run)


def test_vandermonde_opcheck(device):
    v = testing.make_tensor((3, 8), c64, device, requires_grad=True)
    x = s4d_nodes((8,), c64, device).requires_grad_(True)
    u = testing.make_tensor((2, 1, 37), torch.float32, device, requires_grad=True)
    ops = torch.ops.ssm_kernels
    testing.run_opcheck(ops.log_vandermonde_fwd, (v, x, 37, True))
    testing.run_opcheck(ops.log_vandermonde_fwd, (v, x, 37, False))
    testing.run_opcheck(ops.log_vandermonde_transpose_fwd, (u, v, x, 37))
    vd, xd = v.detach(), x.detach()
    testing.run_opcheck(ops.log_vandermonde_bwd, (vd, xd, 37, testing.make_tensor((3, 37), torch.float32, device), True))
    testing.run_opcheck(ops.log_vandermonde_bwd, (vd, xd, 37, testing.make_tensor((3, 37), c64, device), False))
    testing.run_opcheck(ops.log_vandermonde_transpose_bwd,
                        (u.detach(), vd, xd, 37, testing.make_tensor((2, 3, 8), c64, device)))


def test_vandermonde_compile(device):
    v = testing.make_tensor((2, 3, 16), c64, device, requires_grad=True)
    x = s4d_nodes((3, 16), c64, device).requires_grad_(True)
    u = testing.make_tensor((3, 50), torch.float32, device, requires_grad=True)

    def fn(u, v, x):
        k = ssm_kernels.log_vandermonde(v, x, 50)
        kc = ssm_kernels.log_vandermonde(v, x, 50, symmetric=False)
        t = ssm_kernels.log_vandermonde_transpose(u, v, x, 50)
        return k, kc, t

    testing.check_compile(fn, u, v, x, dtype=c64)
    # The backward through the compiled graph (AOT autograd calls the _bwd ops).
    def loss(outs):
        k, kc, t = outs
        return k.sum() + kc.abs().sum() + t.abs().sum()

    eager = torch.autograd.grad(loss(fn(u, v, x)), (u, v, x))
    compiled_fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled = torch.autograd.grad(loss(compiled_fn(u, v, x)), (u, v, x))
    for a, b in zip(compiled, eager):
        testing.assert_close(a, b, c64, "compiled grad")


def test_vandermonde_gradcheck(device):
    v = testing.make_tensor((2, 3), c128, device, requires_grad=True)
    x = s4d_nodes((2, 3), c128, device, dt_max=0.5).requires_grad_(True)
    u = testing.make_tensor((2, 5), torch.float64, device, requires_grad=True)
    uc = testing.make_tensor((2, 5), c128, device, requires_grad=True)
    testing.check_gradcheck(lambda v, x: ssm_kernels.log_vandermonde(v, x, 5), [v, x])
    testing.check_gradcheck(lambda v, x: ssm_kernels.log_vandermonde(v, x, 5, False), [v, x])
    testing.check_gradcheck(lambda u, v, x: ssm_kernels.log_vandermonde_transpose(u, v, x, 5), [u, v, x])
    testing.check_gradcheck(lambda u, v, x: ssm_kernels.log_vandermonde_transpose(u, v, x, 5), [uc, v, x])


def test_vandermonde_bad_inputs(device):
    v = testing.make_tensor((4, 8), c64, device)
    x = s4d_nodes((4, 8), c64, device)
    u = testing.make_tensor((4, 16), torch.float32, device)
    raises = testing.assert_raises_naming
    lv, lvt = ssm_kernels.log_vandermonde, ssm_kernels.log_vandermonde_transpose
    raises(TypeError, "v", lv, v.real.contiguous(), x, 16)
    raises(TypeError, "x", lv, v, x.real.contiguous(), 16)
    raises(TypeError, "x", lv, v, x.to(c128), 16)
    raises(ValueError, "x", lv, v, s4d_nodes((4, 7), c64, device), 16)
    raises(ValueError, "x", lv, v, s4d_nodes((3, 8), c64, device), 16)
    raises(ValueError, "L", lv, v, x, 0)
    raises(TypeError, "L", lv, v, x, 16.0)
    raises(ValueError, "x", lv, v, x.to("meta"), 16)
    raises(TypeError, "symmetric", lv, v, x, 16, None)
    raises(TypeError, "u", lvt, u.double(), v, x, 16)
    raises(TypeError, "u", lvt, u.int(), v, x, 16)
    raises(ValueError, "u", lvt, u, v, x, 15)
    raises(ValueError, "u", lvt, testing.make_tensor((3, 16), torch.float32, device), v, x, 16)
    raises(ValueError, "u", lvt, u.to("meta"), v, x, 16)
    ops = torch.ops.ssm_kernels
    raises((RuntimeError, ValueError), "L", ops.log_vandermonde_fwd, v, x, 0, True)
    raises((RuntimeError, ValueError), "x", ops.log_vandermonde_fwd, v, s4d_nodes((4, 7), c64, device), 16, True)
    raises((RuntimeError, TypeError), "x", ops.log_vandermonde_fwd, v, x.to(c128), 16, True)
    raises((RuntimeError, ValueError), "u", ops.log_vandermonde_transpose_fwd, u, v, x, 15)
    raises((RuntimeError, ValueError), "dout", ops.log_vandermonde_bwd, v, x, 16,
           testing.make_tensor((4, 15), torch.float32, device), True)


def test_compat_s4_vandermonde_is_the_full_conjugate_state(device):
    """The S4 repository's conventions: half-state v, x; conj=True gives 2 Re over the half,
    i.e. the plain sum over the full state [v, conj v], [x, conj x]."""
    from ssm_kernels.compat import s4

    v = testing.make_tensor((3, 16), c64, device)
    x = s4d_nodes((3, 16), c64, device)
    u = testing.make_tensor((3, 200), torch.float32, device)
    v64, x64 = v.to(c128), x.to(c128)
    full = reference.log_vandermonde(torch.cat([v64, v64.conj()], -1), torch.cat([x64, x64.conj()], -1), 200,
                                     symmetric=False)
    testing.assert_close(s4.log_vandermonde(v, x, 200), full.real, c64, "conj=True")
    testing.assert_close(s4.log_vandermonde(v, x, 200, conj=False),
                         reference.log_vandermonde(v64, x64, 200, symmetric=False), c64, "conj=False")
    testing.assert_close(s4.log_vandermonde_transpose(u, v, x, 200),
                         reference.log_vandermonde_transpose(u.double(), v64, x64, 200), c64, "transpose")
