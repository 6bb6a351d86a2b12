"""The chunked-einsum pieces shared by the plain-PyTorch baselines of ssd_scan and mamba3_scan
(both are SSD chunks, Listing 1 of Dao & Gu 2024; Mamba-3 only changes the intra-chunk mask), and
the layer shapes both are benchmarked at."""
import torch
import torch.nn.functional as F


def layer_shapes(cpu_nheads, chunk):
    """The benchmark shapes of a chunked scan: a Mamba-2 layer's heads (headdim 64, dstate 128, one
    group); on CPU one row of 2048 tokens with cpu_nheads heads, on CUDA 4 rows of 4096 with 32."""
    heads = {"headdim": 64, "dstate": 128, "groups": 1, "chunk": chunk}
    return {
        "cpu": [{"batch": 1, "seqlen": 2048, "nheads": cpu_nheads, **heads}],
        "cuda": [{"batch": 4, "seqlen": 4096, "nheads": 32, **heads}],
    }


def segsum(a):
    """[..., T] -> [..., T, T]: entry (t, s) = a_{s+1} + ... + a_t for s <= t, -inf above."""
    T = a.shape[-1]
    cs = torch.cumsum(a, dim=-1)
    diff = cs[..., :, None] - cs[..., None, :]
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
    return diff.masked_fill(~keep, float("-inf"))


def to_chunks(t, chunk):
    """[B, L, H, ...] -> [B, nc, Q, H, ...], zero-padded to whole chunks of Q = chunk steps."""
    pad = (-t.shape[1]) % chunk
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def per_head_chunks(t, chunk):
    """[B, L, H] -> [B, H, nc, Q]: a per-step, per-head scalar (log decay, weight) in chunks."""
    return to_chunks(t, chunk).permute(0, 3, 1, 2)


def from_chunks(y, seqlen):
    """[B, nc, Q, H, P] -> [B, L, H, P], the padding of the last chunk cut off."""
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :seqlen]


def states_entering_chunks(chunk_states, a_cs):
    """The state entering each chunk, [B, nc, H, P, N] (zero for the first), from the states the
    chunks' own tokens leave at their ends, chunk_states [B, nc, H, P, N], and the cumulative log
    decays within the chunks, a_cs [B, H, nc, Q]: the recurrence across chunks."""
    states = torch.cat([torch.zeros_like(chunk_states[:, :1]), chunk_states], dim=1)
    chunk_decay = torch.exp(segsum(F.pad(a_cs[..., -1], (1, 0))))  # [B, H, nc+1, nc+1]
    return torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
