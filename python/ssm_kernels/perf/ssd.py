"""ssd_scan benchmark: against the chunked einsum formulation of the Mamba-2 paper (`ssd_minimal`,
Listing 1 of Dao & Gu 2024, written here in plain PyTorch, differentiated by autograd) and
mamba_ssm's Triton mamba_chunk_scan_combined when importable."""
import torch

from .chunked import from_chunks, layer_shapes, per_head_chunks, segsum, states_entering_chunks, to_chunks
from .registry import BenchOp, peer, register


def _make_inputs(shape, device, dtype):
    b, l, h, p = shape["batch"], shape["seqlen"], shape["nheads"], shape["headdim"]
    g, n = shape["groups"], shape["dstate"]
    return {
        "x": torch.randn(b, l, h, p, device=device, dtype=dtype),
        "dt": (torch.rand(b, l, h, device=device) * 0.1 + 0.001).to(dtype),
        "A": -torch.rand(h, device=device) * 2.0 - 0.1,
        "B": (torch.randn(b, l, g, n, device=device) * n**-0.5).to(dtype),
        "C": torch.randn(b, l, g, n, device=device, dtype=dtype),
        "chunk_size": shape["chunk"],
    }


def ssd_minimal(x, dt, A, B, C, chunk_size):
    """The paper's chunked SSD in einsums (the plain-PyTorch baseline); float32 inside."""
    seqlen, nheads = x.shape[1], x.shape[2]
    rep = nheads // B.shape[2]
    X = to_chunks(x.float() * dt.float()[..., None], chunk_size)  # [B, nc, Q, H, P]
    Bh = to_chunks(B.float().repeat_interleave(rep, dim=2), chunk_size)  # [B, nc, Q, H, N]
    Ch = to_chunks(C.float().repeat_interleave(rep, dim=2), chunk_size)
    a = per_head_chunks(dt.float() * A.float(), chunk_size)  # [B, H, nc, Q]
    a_cs = torch.cumsum(a, dim=-1)
    # intra-chunk: (C B^T masked by the decays) X
    decay = torch.exp(segsum(a))  # [B, H, nc, Q, Q]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, decay, X)
    # per-chunk states, then the recurrence across chunks
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # [B, H, nc, Q]
    states = states_entering_chunks(torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, to_end, X), a_cs)
    # inter-chunk: C against the state entering each chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(a_cs))
    return from_chunks(y_diag + y_off, seqlen).to(x.dtype)


def _baselines():
    out = {"torch": lambda inp: ssd_minimal(**inp)}
    mod = peer("mamba_ssm.ops.triton.ssd_combined")
    if mod is not None and hasattr(mod, "mamba_chunk_scan_combined"):
        out["mamba_ssm"] = lambda inp: mod.mamba_chunk_scan_combined(
            inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["chunk_size"]
        )
    return out


def _flops(s):
    b, l, h, p, n, g, q = s["batch"], s["seqlen"], s["nheads"], s["headdim"], s["dstate"], s["groups"], s["chunk"]
    chunks = -(-l // q)
    # C B^T per group, GL X per head, the chunk states and C H per head
    return 2.0 * b * chunks * (g * q * q * n + h * (q * q * p + 2 * q * p * n))


def _bytes(s, dtype):
    elem = dtype.itemsize
    b, l, h, p, n, g = s["batch"], s["seqlen"], s["nheads"], s["headdim"], s["dstate"], s["groups"]
    return elem * b * l * (2 * h * p + h + 2 * g * n)


register(
    BenchOp(
        name="ssd",
        function="ssd_scan",
        shapes=layer_shapes(cpu_nheads=24, chunk=256),
        make_inputs=_make_inputs,
        baselines=_baselines(),
        flops=_flops,
        bytes=_bytes,
        grad_inputs=("x", "dt", "A", "B", "C"),
        # the float64 loop reference is checked on a shorter, narrower cut of the shape
        reference_shape=lambda s: {**s, "batch": 1, "seqlen": min(s["seqlen"], 600), "nheads": min(s["nheads"], 4)},
        # CUDA: three chunks (intra-chunk, state passing, a chunk after two) on a few heads
        check_shape=lambda s: {**s, "batch": 1, "seqlen": min(s["seqlen"], 3 * s["chunk"]), "nheads": min(s["nheads"], 8)},
    )
)
