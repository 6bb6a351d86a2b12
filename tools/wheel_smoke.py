"""Checks an installed ssm_kernels (a wheel in a fresh virtual environment), run from outside the
source tree by tools/wheel_check.sh: the package loads from site-packages, the CPU code is portable
(compiled for the baseline ISA), every op runs forward and backward on small CPU inputs and agrees
with its float64 reference, and a faked torch major.minor is refused at import.

usage: python wheel_smoke.py EXPECTED_PREFIX
"""
import os
import subprocess
import sys
import textwrap

import torch

import ssm_kernels
from ssm_kernels import reference
from ssm_kernels.testing import assert_close, make_tensor

torch.manual_seed(0)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def widen(v):
    """float64/complex128 copy of a float32/complex64 tensor; anything else as is."""
    wide = {torch.float32: torch.float64, torch.complex64: torch.complex128}
    return v.detach().to(wide[v.dtype]) if isinstance(v, torch.Tensor) and v.dtype in wide else v


def check(name, ours, ref, inputs, grad_names, dtype=torch.float32):
    """Run `ours` on float32/complex64 leaves and `ref` on their float64 copies; compare the
    outputs and the gradients of `grad_names` (a sum of random projections of the outputs)."""
    x = {k: leaf(v) if k in grad_names else v for k, v in inputs.items()}
    x64 = {k: leaf(widen(v)) if k in grad_names else widen(v) for k, v in inputs.items()}
    out, out64 = ours(**x), ref(**x64)
    outs = out if isinstance(out, tuple) else (out,)
    outs64 = out64 if isinstance(out64, tuple) else (out64,)
    for i, (a, e) in enumerate(zip(outs, outs64)):
        assert_close(a, e, dtype, name=f"{name} output {i}")
    if not grad_names:
        return
    weights = [torch.randn_like(o.detach(), dtype=torch.float64 if not o.is_complex() else torch.complex128)
               for o in outs]
    loss = sum((o * w.to(o.dtype)).real.sum() if o.is_complex() else (o * w.to(o.dtype)).sum()
               for o, w in zip(outs, weights))
    loss64 = sum((o * w).real.sum() if o.is_complex() else (o * w).sum() for o, w in zip(outs64, weights))
    grads = torch.autograd.grad(loss, [x[n] for n in grad_names])
    grads64 = torch.autograd.grad(loss64, [x64[n] for n in grad_names])
    for n, g, g64 in zip(grad_names, grads, grads64):
        assert_close(g, g64, dtype, name=f"{name} grad {n}")
    print(f"ok {name}: forward and backward ({', '.join(grad_names)})")


def f32(*shape):
    return make_tensor(shape, torch.float32)


def c64(*shape):
    return make_tensor(shape, torch.complex64)


def run_ops():
    batch, dim, seqlen, dstate = 2, 5, 37, 4
    check("causal_conv1d", ssm_kernels.causal_conv1d, reference.causal_conv1d,
          dict(x=f32(batch, dim, seqlen), weight=f32(dim, 4), bias=f32(dim), activation="silu"),
          ("x", "weight", "bias"))
    A = -torch.rand(dim, dstate) - 0.5
    check("selective_scan", ssm_kernels.selective_scan, reference.selective_scan,
          dict(u=f32(batch, dim, seqlen), delta=torch.rand(batch, dim, seqlen) * 0.5, A=A,
               B=f32(batch, dstate, seqlen), C=f32(batch, dstate, seqlen), D=f32(dim), z=f32(batch, dim, seqlen),
               delta_softplus=True),
          ("u", "delta", "A", "B", "C", "D", "z"))
    nheads, headdim, groups = 4, 3, 2
    check("ssd_scan", ssm_kernels.ssd_scan, reference.ssd_scan,
          dict(x=f32(batch, seqlen, nheads, headdim), dt=torch.rand(batch, seqlen, nheads) * 0.5,
               A=-torch.rand(nheads) - 0.5, B=f32(batch, seqlen, groups, dstate), C=f32(batch, seqlen, groups, dstate),
               chunk_size=16, D=f32(nheads)),
          ("x", "dt", "A", "B", "C", "D"))
    check("fftconv", ssm_kernels.fftconv, reference.fftconv,
          dict(u=f32(batch, dim, seqlen), k=f32(dim, seqlen), D=f32(dim), activation="gelu"), ("u", "k", "D"))
    check("linear_scan", ssm_kernels.linear_scan, reference.linear_scan,
          dict(a=torch.rand(batch, dim, seqlen) * 0.9, b=f32(batch, dim, seqlen)), ("a", "b"))
    N, L = 6, 11
    w = torch.complex(-torch.rand(dim, N) - 0.1, torch.randn(dim, N))
    check("cauchy", ssm_kernels.cauchy, reference.cauchy,
          dict(v=c64(dim, N), z=torch.exp(2j * torch.pi * torch.arange(L) / L).to(torch.complex64), w=w.to(torch.complex64)),
          ("v", "w"), dtype=torch.complex64)
    x = torch.complex(-torch.rand(dim, N) * 0.2, torch.randn(dim, N)).to(torch.complex64)
    check("log_vandermonde", ssm_kernels.log_vandermonde, reference.log_vandermonde,
          dict(v=c64(dim, N), x=x, L=L), ("v", "x"))
    check("log_vandermonde_transpose", ssm_kernels.log_vandermonde_transpose, reference.log_vandermonde_transpose,
          dict(u=f32(dim, L), v=c64(dim, N), x=x, L=L), ("u", "v", "x"), dtype=torch.complex64)

    # The decode steps update their state in place and are not differentiable: forward only.
    conv_state, x1, weight = f32(batch, dim, 3), f32(batch, dim), f32(dim, 4)
    state64 = conv_state.double()
    out = ssm_kernels.causal_conv1d_update(x1, conv_state, weight, activation="silu")
    out64 = reference.causal_conv1d_update(x1.double(), state64, weight.double(), activation="silu")
    assert_close(out, out64, torch.float32, name="causal_conv1d_update output")
    assert_close(conv_state, state64, torch.float32, name="causal_conv1d_update conv_state")
    print("ok causal_conv1d_update: forward (in place)")
    state, dt = f32(batch, dim, dstate), torch.rand(batch, dim) * 0.5
    x1, Bs, Cs = f32(batch, dim), f32(batch, dstate), f32(batch, dstate)
    state64 = state.double()
    out = ssm_kernels.selective_state_update(state, x1, dt, A, Bs, Cs)
    out64 = reference.selective_state_update(state64, x1.double(), dt.double(), A.double(), Bs.double(), Cs.double())
    assert_close(out, out64, torch.float32, name="selective_state_update output")
    assert_close(state, state64, torch.float32, name="selective_state_update state")
    print("ok selective_state_update: forward (in place)")


def check_other_torch_refused():
    """A faked torch major.minor: the import must fail with both versions and where to get a build."""
    code = textwrap.dedent("""
        import torch
        torch.__version__ = "2.99.0"
        try:
            import ssm_kernels
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("imported under a faked torch 2.99")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    built = ".".join(torch.__version__.split(".")[:2])
    for text in (f"built against torch {built}", "running torch 2.99 (2.99.0)", "+torch2.99"):
        assert text in out, (text, out)
    print("ok: import under a faked torch 2.99 raises:", out.strip())


def main():
    prefix = os.path.realpath(sys.argv[1])
    where = os.path.realpath(ssm_kernels.__file__)
    assert where.startswith(prefix + os.sep), f"ssm_kernels imported from {where}, not from {prefix}"
    info = ssm_kernels.build_info()
    print(f"ssm_kernels {ssm_kernels.__version__} from {os.path.dirname(where)}; build_info {info}")
    # The compiler may assume only the baseline ISA; AVX2 is picked at run time.
    assert info["cpu_isa_build"] in ("sse2", "neon", "generic"), info
    with ssm_kernels.testing.poisoned_outputs():
        run_ops()
    check_other_torch_refused()
    print("wheel smoke test: all ok")


if __name__ == "__main__":
    main()
