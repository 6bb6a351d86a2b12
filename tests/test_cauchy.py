"""cauchy (S4's Cauchy kernel) against the float64 reference, on every device."""
import math

import pytest
import torch

import ssm_kernels
from ssm_kernels import reference, testing

c64, c128 = torch.complex64, torch.complex128


def nodes(L, dtype, device):
    """S4's nodes: points on the unit circle (roots of unity, rotated so z = 1 is not hit twice)."""
    ang = 2 * math.pi * (torch.arange(L, dtype=torch.float64) + 0.5) / L
    return torch.exp(1j * ang).to(dtype).to(device)


def poles(shape, dtype, device, imag_scale=3.0, strided=False):
    """S4-like w: Re(w) in [-1.1, -0.1] keeps |z - w| >= 0.1 on the unit circle."""
    re = -torch.rand(shape, dtype=torch.float64) - 0.1
    im = torch.randn(shape, dtype=torch.float64) * imag_scale
    w = torch.complex(re, im).to(dtype).to(device)
    if strided:
        w = torch.stack([w, torch.zeros_like(w)], dim=-1)[..., 0]
    return w


# A covering design: every N, L, batch shape, broadcast pattern, dtype and option appears, with
# the float64 reference (a Python loop over n) kept affordable.
CASES = [
    # N, L, batch, bcast, dtype, symmetric, strided
    (1, 65536, (), "none", c64, True, False),
    (3, 65536, (3, 5), "mixed", c128, True, True),
    (3, 4096, (7,), "none", c128, False, False),
    (32, 1000, (3, 5), "v-bcast", c64, True, True),
    (64, 2, (7,), "w-bcast", c128, True, False),
    (64, 4096, (7,), "mixed", c64, False, False),
    (100, 1, (3, 5), "none", c64, False, True),
    (100, 1000, (7,), "v-bcast", c128, True, False),
    (256, 1000, (), "none", c128, True, False),
    (256, 4096, (), "none", c64, True, True),
    (1024, 2, (7,), "w-bcast", c64, True, False),
    (1024, 1000, (), "none", c64, False, False),
    (2048, 1000, (), "none", c64, True, False),
    (2048, 1, (3, 5), "mixed", c128, False, False),
    (1, 2, (3, 5), "w-bcast", c64, True, False),
]


def case_id(c):
    return testing.broadcast_case_id(*c)


def make_case(N, L, batch, bcast, dtype, strided, device):
    v_shape, w_shape = testing.broadcast_pair_shapes(batch, bcast, N)
    v = testing.make_tensor(v_shape, dtype, device, strided=strided)
    w = poles(w_shape, dtype, device, strided=strided)
    z = nodes(L, dtype, device)
    return v, z, w


def check_against_reference(v, z, w, symmetric, dtype):
    v_ours, w_ours = testing.clone_leaf(v), testing.clone_leaf(w)
    v_ref, w_ref = testing.clone_leaf(v, c128), testing.clone_leaf(w, c128)
    y = ssm_kernels.cauchy(v_ours, z, w_ours, symmetric)
    y_ref = reference.cauchy(v_ref, z.to(c128), w_ref, symmetric)
    assert y.dtype == dtype and y.shape == y_ref.shape
    testing.assert_close(y, y_ref, dtype, "y")
    g = torch.randn_like(y_ref)
    dv, dw = testing.grads([y], [v_ours, w_ours], [g.to(dtype)])
    dv_ref, dw_ref = testing.grads([y_ref], [v_ref, w_ref], [g])
    assert dv.shape == v.shape and dw.shape == w.shape
    testing.assert_close(dv, dv_ref, dtype, "dv")
    testing.assert_close(dw, dw_ref, dtype, "dw")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_cauchy_matches_reference(case, device):
    N, L, batch, bcast, dtype, sym, strided = case
    v, z, w = make_case(N, L, batch, bcast, dtype, strided, device)
    check_against_reference(v, z, w, sym, dtype)


@pytest.mark.parametrize("dtype", [c64, c128], ids=testing.dtype_id)
def test_cauchy_small_imaginary_poles(dtype, device):
    """Poles close to the real axis, where the two conjugate terms nearly cancel in Im."""
    N, L = 64, 512
    v = testing.make_tensor((4, N), dtype, device)
    w = poles((4, N), dtype, device, imag_scale=1e-4)
    check_against_reference(v, nodes(L, dtype, device), w, True, dtype)


def test_cauchy_strided_equals_contiguous(device):
    v = testing.make_tensor((6, 40), c64, device, strided=True)
    w = poles((6, 40), c64, device, strided=True)
    z = nodes(300, c64, device)
    z_strided = torch.stack([z, z], dim=-1)[:, 0]
    assert not v.is_contiguous() and not w.is_contiguous() and not z_strided.is_contiguous()
    y = ssm_kernels.cauchy(v, z_strided, w)
    y_contig = ssm_kernels.cauchy(v.contiguous(), z, w.contiguous())
    assert torch.equal(y, y_contig)


def test_cauchy_backward_bitwise_reproducible(device):
    v = testing.make_tensor((3, 5, 64), c64, device)
    w = poles((5, 64), c64, device)
    z = nodes(5000, c64, device)  # three backward chunks

    def run():
        vl, wl = testing.clone_leaf(v), testing.clone_leaf(w)
        y = ssm_kernels.cauchy(vl, z, wl)
        return torch.autograd.grad(y, (vl, wl), torch.ones_like(y))

    testing.assert_deterministic(run)


def test_cauchy_opcheck(device):
    v = testing.make_tensor((3, 8), c64, device, requires_grad=True)
    w = poles((8,), c64, device).requires_grad_(True)
    z = nodes(37, c64, device)
    testing.run_opcheck(torch.ops.ssm_kernels.cauchy_fwd, (v, z, w, True))
    testing.run_opcheck(torch.ops.ssm_kernels.cauchy_fwd, (v, z, w, False))
    dout = testing.make_tensor((3, 37), c64, device)
    testing.run_opcheck(torch.ops.ssm_kernels.cauchy_bwd, (v.detach(), z, w.detach(), dout, True))


def test_cauchy_compile(device):
    v = testing.make_tensor((2, 3, 16), c64, device, requires_grad=True)
    w = poles((3, 16), c64, device).requires_grad_(True)
    z = nodes(50, c64, device)

    def fn(v, w):
        return ssm_kernels.cauchy(v, z, w) * 2 + ssm_kernels.cauchy(v, z, w, symmetric=False)

    testing.check_compile(fn, v, w, dtype=c64)
    # The backward through the compiled graph (AOT autograd calls cauchy_bwd).
    g = torch.randn(2, 3, 50, dtype=c64, device=device)
    eager = torch.autograd.grad(fn(v, w), (v, w), g)
    compiled = torch.autograd.grad(torch.compile(fn, fullgraph=True, backend="aot_eager")(v, w), (v, w), g)
    for a, b in zip(compiled, eager):
        testing.assert_close(a, b, c64, "compiled grad")


def test_cauchy_gradcheck(device):
    v = testing.make_tensor((2, 3), c128, device, requires_grad=True)
    w = poles((2, 3), c128, device).requires_grad_(True)
    z = nodes(5, c128, device)
    testing.check_gradcheck(lambda v, w: ssm_kernels.cauchy(v, z, w), [v, w])
    testing.check_gradcheck(lambda v, w: ssm_kernels.cauchy(v, z, w, symmetric=False), [v, w])


def test_cauchy_bad_inputs(device):
    v = testing.make_tensor((4, 8), c64, device)
    w = poles((4, 8), c64, device)
    z = nodes(16, c64, device)
    raises = testing.assert_raises_naming
    raises(TypeError, "v", ssm_kernels.cauchy, v.real.contiguous(), z, w)
    raises(TypeError, "w", ssm_kernels.cauchy, v, z, w.real.contiguous())
    raises(TypeError, "z", ssm_kernels.cauchy, v, z.real.contiguous(), w)
    raises(ValueError, "z", ssm_kernels.cauchy, v, z.reshape(4, 4), w)
    raises(ValueError, "z", ssm_kernels.cauchy, v, z[:0], w)
    raises(ValueError, "w", ssm_kernels.cauchy, v, z, poles((4, 7), c64, device))
    raises(ValueError, "w", ssm_kernels.cauchy, v, z, poles((3, 8), c64, device))
    raises(TypeError, "w", ssm_kernels.cauchy, v, z, w.to(c128))
    raises(TypeError, "z", ssm_kernels.cauchy, v, z.to(c128), w)
    raises(ValueError, "w", ssm_kernels.cauchy, v, z, w.to("meta"))
    raises(ValueError, "z", ssm_kernels.cauchy, v, z.to("meta"), w)
    raises(TypeError, "symmetric", ssm_kernels.cauchy, v, z, w, 1)
    # The C++ driver re-checks what a direct torch.ops call could get wrong.
    op = torch.ops.ssm_kernels.cauchy_fwd
    raises((RuntimeError, ValueError), "w", op, v, z, poles((4, 7), c64, device), True)
    raises((RuntimeError, ValueError), "z", op, v, z.reshape(4, 4), w, True)
    raises((RuntimeError, TypeError), "z", op, v, z.to(c128), w, True)
    raises((RuntimeError, ValueError), "dout", torch.ops.ssm_kernels.cauchy_bwd, v, z, w,
           testing.make_tensor((4, 15), c64, device), True)


def test_compat_cauchy_mult_is_the_full_conjugate_state(device):
    """S4's cauchy_mult: half-state v, w; the result equals the plain Cauchy sum over the full
    state [v, conj v], [w, conj w], and the gradients are those of the half state."""
    from ssm_kernels.compat.s4 import cauchy_mult

    v = testing.make_tensor((3, 16), c64, device)
    w = poles((3, 16), c64, device)
    z = nodes(64, c64, device)
    vl, wl = testing.clone_leaf(v), testing.clone_leaf(w)
    y = cauchy_mult(vl, z, wl)
    vr, wr = testing.clone_leaf(v, c128), testing.clone_leaf(w, c128)
    y_full = reference.cauchy(torch.cat([vr, vr.conj()], -1), z.to(c128), torch.cat([wr, wr.conj()], -1),
                              symmetric=False)
    testing.assert_close(y, y_full, c64, "y")
    g = torch.randn_like(y_full)
    for a, b, name in zip(testing.grads([y], [vl, wl], [g.to(c64)]), testing.grads([y_full], [vr, wr], [g]),
                          ("dv", "dw")):
        testing.assert_close(a, b, c64, name)
