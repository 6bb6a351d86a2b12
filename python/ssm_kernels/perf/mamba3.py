"""mamba3_scan benchmark (SISO): against the chunked form written in plain PyTorch einsums
(docs/mamba3.md: an SSD chunk with a modified mask, differentiated by autograd) and mamba_ssm's
Triton mamba3_siso_combined when importable."""
import math

import torch
import torch.nn.functional as F

import ssm_kernels
from ssm_kernels import reference

from .chunked import from_chunks, layer_shapes, per_head_chunks, segsum, states_entering_chunks, to_chunks
from .registry import BenchOp, peer, register


def _make_inputs(shape, device, dtype):
    b, l, h, p, n, g = shape["batch"], shape["seqlen"], shape["nheads"], shape["headdim"], shape["dstate"], shape["groups"]
    dt = torch.rand(b, h, l, device=device) * 0.1 + 0.001
    return {
        "q": torch.randn(b, l, g, n, device=device, dtype=dtype),
        "k": (torch.randn(b, l, g, n, device=device) * n**-0.5).to(dtype),
        "v": torch.randn(b, l, h, p, device=device, dtype=dtype),
        "adt": -dt * (torch.rand(h, 1, device=device) + 0.5),
        "dt": dt,
        "trap": torch.randn(b, h, l, device=device),
        "q_bias": torch.randn(h, n, device=device) * 0.1,
        "k_bias": torch.randn(h, n, device=device) * 0.1,
        "angles": torch.randn(b, l, h, n // 4, device=device),
        "D": torch.randn(h, device=device),
        "z": torch.randn(b, l, h, p, device=device, dtype=dtype),
        "chunk_size": shape["chunk"],
    }


def _rotate(x, theta):
    A = theta.shape[-1]
    x0, x1 = x[..., 0:2 * A:2], x[..., 1:2 * A:2]
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return torch.cat((rot, x[..., 2 * A:]), dim=-1)


def mamba3_chunked(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, chunk_size):
    """SISO Mamba-3 in chunked einsums (the plain-PyTorch baseline); float32 inside."""
    seqlen, groups = q.shape[1], q.shape[2]
    rep = v.shape[2] // groups
    Q = chunk_size
    dt_ = dt.float().transpose(1, 2)  # [B, L, H]
    lam = torch.sigmoid(trap.float()).transpose(1, 2)
    theta = torch.cumsum(math.pi * torch.tanh(angles.float()) * dt_[..., None], dim=1)  # [B, L, H, A]
    qh = _rotate(q.float().repeat_interleave(rep, dim=2) + q_bias.float(), theta)  # [B, L, H, N]
    kh = _rotate(k.float().repeat_interleave(rep, dim=2) + k_bias.float(), theta)
    gamma = lam * dt_
    w = gamma + F.pad((1 - lam[:, 1:]) * dt_[:, 1:], (0, 0, 0, 1))
    X = to_chunks(v.float(), Q)  # [B, nc, Q, H, P]
    qh, kh = to_chunks(qh, Q), to_chunks(kh, Q)  # [B, nc, Q, H, N]
    a, w, gamma = (per_head_chunks(t, Q) for t in (adt.float().transpose(1, 2), w, gamma))  # [B, H, nc, Q]
    a_cs = torch.cumsum(a, dim=-1)
    # the mask: decay(t, s) w_s below the diagonal, gamma_t on it
    eye = torch.eye(Q, dtype=torch.bool, device=q.device)
    mask = torch.exp(segsum(a)) * torch.where(eye, gamma[..., :, None], w[..., None, :])
    cb = torch.einsum("bclhn,bcshn->bhcls", qh, kh)
    y = torch.einsum("bhcls,bcshp->bclhp", cb * mask, X)
    to_end = torch.exp(a_cs[..., -1:] - a_cs) * w  # [B, H, nc, Q]
    states = states_entering_chunks(torch.einsum("bclhn,bhcl,bclhp->bchpn", kh, to_end, X), a_cs)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", qh, states, torch.exp(a_cs))
    y = from_chunks(y, seqlen)
    y = (y + D.float()[:, None] * v.float()) * F.silu(z.float())
    return y.to(v.dtype)


def _baselines():
    out = {"torch": lambda inp: mamba3_chunked(**inp)}
    mod = peer("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined")
    if mod is not None and hasattr(mod, "mamba3_siso_combined"):
        out["mamba_ssm"] = lambda inp: mod.mamba3_siso_combined(
            inp["q"], inp["k"], inp["v"], inp["adt"], inp["dt"], inp["trap"], inp["q_bias"], inp["k_bias"],
            inp["angles"], inp["D"], inp["z"], chunk_size=inp["chunk_size"])
    return out


def _flops(s):
    b, l, h, p, n, q = s["batch"], s["seqlen"], s["nheads"], s["headdim"], s["dstate"], s["chunk"]
    chunks = -(-l // q)
    # q k^T and its product with v per head, the inter-chunk term and the state update
    return 2.0 * b * chunks * h * (q * q * n + q * q * p + 2 * q * p * n)


def _bytes(s, dtype):
    elem = dtype.itemsize
    b, l, h, p, n, g = s["batch"], s["seqlen"], s["nheads"], s["headdim"], s["dstate"], s["groups"]
    return elem * b * l * (3 * h * p + 2 * g * n) + 4 * b * l * h * (3 + n // 4)


register(
    BenchOp(
        name="mamba3",
        shapes=layer_shapes(cpu_nheads=16, chunk=64),
        make_inputs=_make_inputs,
        ours=lambda inp: ssm_kernels.mamba3_scan(**inp),
        reference=lambda inp: reference.mamba3_scan(**inp),
        baselines=_baselines(),
        flops=_flops,
        bytes=_bytes,
        grad_inputs=("q", "k", "v", "adt", "dt", "trap", "angles"),
        reference_shape=lambda s: {**s, "batch": 1, "seqlen": min(s["seqlen"], 200), "nheads": min(s["nheads"], 2)},
        check_shape=lambda s: {**s, "batch": 1, "seqlen": min(s["seqlen"], 3 * s["chunk"]), "nheads": min(s["nheads"], 4)},
    )
)
