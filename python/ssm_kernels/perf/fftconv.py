"""fftconv benchmark: against the plain torch.fft.rfft/irfft convolution a user writes (with its
autograd), and FlashFFTConv when installed (GPU)."""
import math

import torch

from .registry import BenchOp, peer, register


def _make_inputs(shape, device, dtype):
    b, d, l = shape["batch"], shape["dim"], shape["seqlen"]
    inp = {
        "u": torch.randn(b, d, l, device=device, dtype=dtype),
        "k": torch.randn(d, l, device=device, dtype=torch.float32) / math.sqrt(l),
        "D": torch.randn(d, device=device, dtype=torch.float32),
        "pregate": None,
        "postgate": None,
    }
    if shape.get("gated"):
        inp["pregate"] = torch.randn(b, d, l, device=device, dtype=dtype)
        inp["postgate"] = torch.randn(b, d, l, device=device, dtype=dtype)
    return inp


def _torch_fftconv(inp):
    """What a user writes: zero-pad to 2L, rfft, multiply, irfft, crop, skip, gates."""
    u, k, D = inp["u"], inp["k"], inp["D"]
    L = u.shape[-1]
    n = 2 * L
    v = u if inp.get("pregate") is None else u * inp["pregate"]
    y = torch.fft.irfft(torch.fft.rfft(v.float(), n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    y = y + D[:, None] * v.float()
    if inp.get("postgate") is not None:
        y = y * inp["postgate"].float()
    return y.to(u.dtype)


def _baselines():
    out = {"torch": _torch_fftconv}
    ffc = peer("flashfftconv")
    if ffc is not None and hasattr(ffc, "FlashFFTConv"):
        convs = {}

        def run(inp):
            u = inp["u"]
            key = (2 * u.shape[-1], u.dtype, u.device)
            if key not in convs:
                convs[key] = ffc.FlashFFTConv(key[0], dtype=u.dtype).to(u.device)
            y = convs[key](u, inp["k"], pregate=inp.get("pregate"), postgate=None)
            y = y + (inp["D"][:, None] * (u if inp.get("pregate") is None else u * inp["pregate"])).to(u.dtype)
            return y if inp.get("postgate") is None else y * inp["postgate"]

        out["flashfftconv"] = run
    return out


def _fft_flops(n):
    return 2.5 * n * math.log2(max(n, 2))


def _flops(s):
    n = 2 * s["seqlen"]
    rows = s["batch"] * s["dim"]
    return rows * (2 * _fft_flops(n) + 6 * (n // 2 + 1)) + s["dim"] * _fft_flops(n)


def _bytes(s, dtype):
    elem = dtype.itemsize
    streams = 2 + (2 if s.get("gated") else 0)  # u and out, plus both gates
    return s["batch"] * s["dim"] * s["seqlen"] * elem * streams + s["dim"] * s["seqlen"] * 4


register(
    BenchOp(
        name="fftconv",
        shapes={
            "cpu": [{"batch": 2, "dim": 768, "seqlen": 4096, "gated": 0}],
            "cuda": [
                {"batch": 64, "dim": 768, "seqlen": 1024, "gated": 1},
                {"batch": 64, "dim": 768, "seqlen": 4096, "gated": 1},
                {"batch": 64, "dim": 768, "seqlen": 16384, "gated": 1},
            ],
        },
        make_inputs=_make_inputs,
        baselines=_baselines(),
        flops=_flops,
        bytes=_bytes,
        grad_inputs=("u", "k", "D", "pregate", "postgate"),
        # The direct-sum reference is O(L^2): check on a cut-down shape with the same options.
        reference_shape=lambda s: {**s, "batch": 1, "dim": 4, "seqlen": min(s["seqlen"], 1024)},
        # CUDA: the full length (the kernel's FFT size) on a few channels
        check_shape=lambda s: {**s, "batch": 1, "dim": min(s["dim"], 16)},
    )
)
