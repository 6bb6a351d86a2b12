"""causal_conv1d benchmark: against F.conv1d + SiLU (what a user writes) and the causal-conv1d
package when installed."""
import torch
import torch.nn.functional as F


from .registry import BenchOp, peer, register


def _make_inputs(shape, device, dtype):
    b, d, l, w = shape["batch"], shape["dim"], shape["seqlen"], shape["width"]
    return {
        "x": torch.randn(b, d, l, device=device, dtype=dtype),
        "weight": torch.randn(d, w, device=device, dtype=torch.float32) / w**0.5,
        "bias": torch.randn(d, device=device, dtype=torch.float32),
        "activation": "silu",
    }


def _torch_conv(inp):
    x, w = inp["x"], inp["weight"]
    width = w.shape[1]
    y = F.conv1d(x, w.to(x.dtype).unsqueeze(1), inp["bias"].to(x.dtype), padding=width - 1, groups=x.shape[1])
    return F.silu(y[..., : x.shape[-1]])


def _baselines():
    out = {"torch": _torch_conv}
    cc = peer("causal_conv1d")
    if cc is not None and hasattr(cc, "causal_conv1d_fn"):
        out["causal_conv1d"] = lambda inp: cc.causal_conv1d_fn(
            inp["x"], inp["weight"].to(inp["x"].dtype), inp["bias"].to(inp["x"].dtype), activation="silu"
        )
    return out


def _bytes(shape, dtype):
    elem = dtype.itemsize
    return 2 * shape["batch"] * shape["dim"] * shape["seqlen"] * elem


register(
    BenchOp(
        name="causal_conv1d",
        shapes={
            "cpu": [{"batch": 1, "dim": 1792, "seqlen": 2048, "width": 4}],
            "cuda": [
                {"batch": 8, "dim": 4096, "seqlen": 4096, "width": 4},
                {"batch": 4, "dim": 2048, "seqlen": 2048, "width": 4},
            ],
        },
        make_inputs=_make_inputs,
        baselines=_baselines(),
        flops=lambda s: 2.0 * s["batch"] * s["dim"] * s["seqlen"] * s["width"],
        bytes=_bytes,
        grad_inputs=("x", "weight", "bias"),
        check_shape=lambda s: {**s, "batch": 1, "dim": min(s["dim"], 512)},
    )
)
