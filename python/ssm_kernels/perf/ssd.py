"""ssd_scan benchmark: against the chunked einsum formulation of the Mamba-2 paper (`ssd_minimal`,
Listing 1 of Dao & Gu 2024, written here in plain PyTorch, differentiated by autograd) and
mamba_ssm's Triton mamba_chunk_scan_combined when importable."""
import torch
import torch.nn.functional as F


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


def _segsum(a):
    """[..., T] -> [..., T, T]: entry (i, j) = a_{j+1} + ... + a_i for j <= i, -inf above."""
    T = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    diff = cs[..., :, None] - cs[..., None, :]
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return diff.masked_fill(~keep, float("-inf"))


def ssd_minimal(x, dt, A, B, C, chunk_size):
    """The paper's chunked SSD in einsums (the plain-PyTorch baseline); float32 inside."""
    batch, seqlen, nheads, headdim = x.shape
    rep = nheads // B.shape[2]
    Q = chunk_size
    pad = (-seqlen) % Q
    X = (x.float() * dt.float()[..., None])  # [B, L, H, P]
    a = dt.float() * A.float()  # [B, L, H]
    Bh = B.float().repeat_interleave(rep, dim=2)  # [B, L, H, N]
    Ch = C.float().repeat_interleave(rep, dim=2)
    if pad:
        X, Bh, Ch = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (X, Bh, Ch))
        a = F.pad(a, (0, 0, 0, pad))
    nc = (seqlen + pad) // Q
    X = X.reshape(batch, nc, Q, nheads, -1)
    Bh = Bh.reshape(batch, nc, Q, nheads, -1)
    Ch = Ch.reshape(batch, nc, Q, nheads, -1)
    a = a.reshape(batch, nc, Q, nheads).permute(0, 3, 1, 2)  # [B, H, nc, Q]
    a_cs = torch.cumsum(a, dim=-1)
    # intra-chunk: (C B^T masked by the decays) X
    decay = torch.exp(_segsum(a))  # [B, H, nc, Q, Q]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Ch, Bh, decay, X)
    # per-chunk states, then the recurrence across chunks
    to_end = torch.exp(a_cs[..., -1:] - a_cs)  # [B, H, nc, Q]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, to_end, X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    chunk_decay = torch.exp(_segsum(F.pad(a_cs[..., -1], (1, 0))))  # [B, H, nc+1, nc+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
    # inter-chunk: C against the state entering each chunk
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, states, torch.exp(a_cs))
    y = (y_diag + y_off).reshape(batch, nc * Q, nheads, headdim)[:, :seqlen]
    return y.to(x.dtype)


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
    elem = torch.empty((), dtype=dtype).element_size()
    b, l, h, p, n, g = s["batch"], s["seqlen"], s["nheads"], s["headdim"], s["dstate"], s["groups"]
    return elem * b * l * (2 * h * p + h + 2 * g * n)


register(
    BenchOp(
        name="ssd",
        function="ssd_scan",
        shapes={
            "cpu": [{"batch": 1, "seqlen": 2048, "nheads": 24, "headdim": 64, "dstate": 128, "groups": 1,
                     "chunk": 256}],
            "cuda": [{"batch": 4, "seqlen": 4096, "nheads": 32, "headdim": 64, "dstate": 128, "groups": 1,
                      "chunk": 256}],
        },
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
