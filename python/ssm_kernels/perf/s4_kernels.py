"""S4 / S4D kernel benchmarks: cauchy and log_vandermonde against the naive broadcast PyTorch
products (an [B, N, L] tensor, what a user writes; autograd for the backward) and pykeops's lazy
reductions when pykeops is importable."""
import math

import torch

from .registry import BenchOp, peer, register


def _register_s4(name, shapes, make_inputs, torch_fn, keops_fn, flops, bytes, grad_inputs):
    """Registers an S4 kernel in complex64, checked against the float64 reference on at most 64
    rows, with the broadcast PyTorch baseline and pykeops's when it is importable."""
    baselines = {"torch": torch_fn}
    pk = peer("pykeops.torch")
    if pk is not None:
        baselines["pykeops"] = keops_fn(pk)

    def few_rows(s):
        return {**s, "batch": min(s["batch"], 64)}

    register(BenchOp(name=name, shapes=shapes, make_inputs=make_inputs, baselines=baselines, flops=flops,
                     bytes=bytes, dtypes={"cpu": torch.complex64, "cuda": torch.complex64},
                     grad_inputs=grad_inputs, reference_shape=few_rows, check_shape=few_rows))


def _cauchy_inputs(shape, device, dtype):
    b, n, l = shape["batch"], shape["N"], shape["L"]
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    w = torch.complex(-torch.rand(b, n, device=device, dtype=real) - 0.1,
                      torch.randn(b, n, device=device, dtype=real) * 3)
    ang = 2 * math.pi * (torch.arange(l, device=device, dtype=torch.float64) + 0.5) / l
    return {
        "v": torch.randn(b, n, device=device, dtype=dtype),
        "z": torch.exp(1j * ang).to(dtype),
        "w": w,
        "symmetric": True,
    }


def _cauchy_torch(inp):
    v, z, w = inp["v"][..., None], inp["z"], inp["w"][..., None]  # [B, N, 1], [L]
    y = (v / (z - w)).sum(-2)
    if inp["symmetric"]:
        y = y + (v.conj() / (z - w.conj())).sum(-2)
    return y


def _cauchy_keops(keops):
    def run(inp):
        v, z, w = inp["v"], inp["z"], inp["w"]
        if inp["symmetric"]:
            v, w = torch.cat([v, v.conj()], -1), torch.cat([w, w.conj()], -1)
        # complex tensors give pykeops's complex lazy tensors: [B, 1, N, 1] against [1, L, 1, 1]
        vl = keops.LazyTensor(v[:, None, :, None].contiguous())
        wl = keops.LazyTensor(w[:, None, :, None].contiguous())
        zl = keops.LazyTensor(z[None, :, None, None].contiguous())
        return (vl / (zl - wl)).sum(dim=2).squeeze(-1)

    return run


def _cauchy_bytes(shape, dtype):
    elem = dtype.itemsize
    b, n, l = shape["batch"], shape["N"], shape["L"]
    return (2 * b * n + l + b * l) * elem


_register_s4(
    "cauchy",
    shapes={"cpu": [{"batch": 256, "N": 64, "L": 2048}], "cuda": [{"batch": 1024, "N": 64, "L": 16384}]},
    make_inputs=_cauchy_inputs,
    torch_fn=_cauchy_torch,
    keops_fn=_cauchy_keops,
    # per (b, n, l): the two conjugate terms, 16 + 14 real FLOPs with one division each
    flops=lambda s: 30.0 * s["batch"] * s["N"] * s["L"],
    bytes=_cauchy_bytes,
    grad_inputs=("v", "w"),
)


def _vand_inputs(shape, device, dtype):
    b, n, l = shape["batch"], shape["N"], shape["L"]
    real = torch.float32 if dtype == torch.complex64 else torch.float64
    dt = torch.exp(torch.empty(b, 1, device=device, dtype=real).uniform_(math.log(1e-3), math.log(1e-1)))
    A = torch.complex(-0.5 * torch.ones(n, device=device, dtype=real),
                      math.pi * torch.arange(n, device=device, dtype=real))
    return {"v": torch.randn(b, n, device=device, dtype=dtype), "x": (dt * A).to(dtype), "L": l,
            "symmetric": True}


def _vand_torch(inp):
    v, x, L = inp["v"], inp["x"], inp["L"]
    ell = torch.arange(L, device=x.device, dtype=x.real.dtype)
    y = (v[..., None] * torch.exp(x[..., None] * ell)).sum(-2)  # [B, N, L] -> [B, L]
    return 2 * y.real if inp["symmetric"] else y


def _vand_keops(keops):
    def run(inp):
        v, x, L = inp["v"], inp["x"], inp["L"]
        ell = torch.arange(L, device=x.device, dtype=x.dtype)
        vl = keops.LazyTensor(v[:, None, :, None].contiguous())
        xl = keops.LazyTensor(x[:, None, :, None].contiguous())
        ll = keops.LazyTensor(ell[None, :, None, None].contiguous())
        s = (vl * (xl * ll).exp()).sum(dim=2).squeeze(-1)
        return 2 * s.real if inp["symmetric"] else s

    return run


def _vand_bytes(shape, dtype):
    elem = dtype.itemsize
    b, n, l = shape["batch"], shape["N"], shape["L"]
    return 2 * b * n * elem + b * l * elem // 2


_register_s4(
    "log_vandermonde",
    shapes={"cpu": [{"batch": 768, "N": 32, "L": 4096}], "cuda": [{"batch": 1024, "N": 64, "L": 16384}]},
    make_inputs=_vand_inputs,
    torch_fn=_vand_torch,
    keops_fn=_vand_keops,
    # per (b, n, l): one complex multiply-add (the powers come from a table)
    flops=lambda s: 8.0 * s["batch"] * s["N"] * s["L"],
    bytes=_vand_bytes,
    grad_inputs=("v", "x"),
)
