"""linear_scan benchmark: against the sequential PyTorch loop a user writes first, the fastest
plain-PyTorch formulations we know (a time-major loop and a chunked cumprod/cumsum scan), and the
accelerated-scan package when installed (CUDA)."""
import torch

from .registry import BenchOp, peer, register


def _make_inputs(shape, device, dtype):
    b, d, l = shape["batch"], shape["dim"], shape["seqlen"]
    return {
        "a": (torch.rand(b, d, l, device=device) * 0.5 + 0.5).to(dtype),  # decays in [0.5, 1)
        "b": torch.randn(b, d, l, device=device, dtype=dtype),
    }


def torch_loop(inp):
    """h_t = a_t * h_{t-1} + b_t, one time step per iteration on the [..., L] layout (unbind, not
    indexing, so that autograd does not materialise a full-size gradient per step)."""
    a, b = inp["a"], inp["b"]
    h = torch.zeros(a.shape[:-1], dtype=a.dtype, device=a.device)
    hs = []
    for a_t, b_t in zip(a.unbind(-1), b.unbind(-1)):
        h = a_t * h + b_t
        hs.append(h)
    return torch.stack(hs, dim=-1)


def torch_time_major(inp):
    """The loop on time-major copies, so every step reads and writes contiguous rows."""
    a = inp["a"].movedim(-1, 0).contiguous()  # [L, ...]
    b = inp["b"].movedim(-1, 0).contiguous()
    h = torch.zeros(a.shape[1:], dtype=a.dtype, device=a.device)
    hs = []
    for a_t, b_t in zip(a.unbind(0), b.unbind(0)):
        h = torch.addcmul(b_t, a_t, h)
        hs.append(h)
    return torch.stack(hs, dim=-1)


def torch_chunked(inp, chunk: int = 32):
    """Chunked closed form: within a chunk of T steps, h_t = P_t * cumsum(b_s / P_s) with P the
    running product of a (|a| <= 1 keeps P_t / P_s <= 1, and T = 32 keeps P above float32's
    underflow for |a| >= 0.07); the chunks are then linked by a loop over L / T carries."""
    a, b = inp["a"], inp["b"]
    L = a.shape[-1]
    pad = (-L) % chunk
    if pad:
        a = torch.nn.functional.pad(a, (0, pad), value=1.0)
        b = torch.nn.functional.pad(b, (0, pad))
    a = a.reshape(*a.shape[:-1], -1, chunk)  # [..., C, T]
    b = b.reshape(*b.shape[:-1], -1, chunk)
    p = torch.cumprod(a, dim=-1)
    local = p * torch.cumsum(b / p, dim=-1)  # [..., C, T], each chunk scanned from zero
    ends_a, ends_b = p[..., -1], local[..., -1]  # [..., C]
    carry = torch.zeros(a.shape[:-2], dtype=a.dtype, device=a.device)
    carries = []
    for end_a, end_b in zip(ends_a.unbind(-1), ends_b.unbind(-1)):
        carries.append(carry)
        carry = end_a * carry + end_b
    h = local + p * torch.stack(carries, dim=-1)[..., None]
    return h.reshape(*h.shape[:-2], -1)[..., :L]


def _baselines():
    out = {"torch": torch_chunked, "torch_tmajor": torch_time_major, "torch_loop": torch_loop}
    warp = peer("accelerated_scan.warp")
    if warp is not None and hasattr(warp, "scan"):
        out["accelerated_scan"] = lambda inp: warp.scan(inp["a"].contiguous(), inp["b"].contiguous())
    return out


def _bytes(shape, dtype):
    elem = dtype.itemsize
    return 3 * shape["batch"] * shape["dim"] * shape["seqlen"] * elem  # read a, b; write h


register(
    BenchOp(
        name="linear_scan",
        shapes={
            "cpu": [{"batch": 8, "dim": 1024, "seqlen": 4096}],
            "cuda": [{"batch": 8, "dim": 4096, "seqlen": 8192}],
        },
        make_inputs=_make_inputs,
        baselines=_baselines(),
        flops=lambda s: 2.0 * s["batch"] * s["dim"] * s["seqlen"],
        bytes=_bytes,
        grad_inputs=("a", "b"),
        # Backward: read a, h, dh and write da, db, against 3 tensors forward.
        bwd_factor=5.0 / 3.0,
        reference_shape=lambda s: {**s, "batch": 1, "dim": 8},
        # CUDA: the full length (the chained chunk carries) on a few rows
        check_shape=lambda s: {**s, "batch": 1, "dim": min(s["dim"], 64)},
    )
)
