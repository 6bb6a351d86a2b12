"""Packed variable-length sequences (cu_seqlens) in selective_scan and linear_scan: the packed call
on sequences summing to T tokens against the same op on one sequence of T tokens ("one_seq": the
cost of packing, target <= 10% more) and on the batch padded to the longest sequence, masked
("padded": what packing replaces; the padding ratio S * max_len / T is in the row's shape).

Lengths are drawn uniformly from [64, max_len] (seeded) until they sum to T (the last one cut)."""
import torch

import ssm_kernels
from ssm_kernels import reference

from ..testing import each_sequence, seq_offsets
from .registry import BenchOp, register
from .selective_scan import FLOPS_PER_ELEMENT

MIN_LEN = 64


def draw_lengths(tokens: int, max_len: int) -> list:
    gen = torch.Generator().manual_seed(0)
    lengths, total = [], 0
    while total < tokens:
        n = int(torch.randint(MIN_LEN, max_len + 1, (1,), generator=gen))
        n = min(n, tokens - total)
        lengths.append(n)
        total += n
    return lengths


def padding_ratio(shape: dict) -> float:
    lengths = draw_lengths(shape["tokens"], shape["max_len"])
    return len(lengths) * max(lengths) / shape["tokens"]


def _pad(t: torch.Tensor, lengths: list) -> torch.Tensor:
    """[1, ..., T] -> [S, ..., max_len], zeros after each sequence."""
    out = t.new_zeros((len(lengths), *t.shape[1:-1], max(lengths)))
    start = 0
    for s, n in enumerate(lengths):
        out[s, ..., :n] = t[0, ..., start:start + n]
        start += n
    return out


def _packing(lengths: list, device) -> dict:
    mask = torch.zeros(len(lengths), 1, max(lengths), device=device)
    for s, n in enumerate(lengths):
        mask[s, :, :n] = 1
    return {"cu_seqlens": seq_offsets(lengths, device), "mask": mask}


def _register_packed(name, function, time_keys, arg_keys, make_row, shapes, grad_inputs, **measures):
    """Registers the packed-sequence benchmark of `function` on the inputs make_row(shape, device,
    dtype) of one row of T tokens (time along the last axis of the tensors in time_keys; arg_keys:
    the op's arguments among them): the packed call (ours), the float64 reference on each sequence
    alone, and the same kernel on the T tokens as one sequence (`one_seq`) and on the padded batch
    (`padded`, whose copies `<key>_pad` are made with the inputs, outside the timing)."""
    op, ref = getattr(ssm_kernels, function), getattr(reference, function)

    def args(inp, suffix=""):
        return {k: inp[k + suffix] if k in time_keys else inp[k] for k in arg_keys}

    def make_inputs(shape, device, dtype):
        lengths = draw_lengths(shape["tokens"], shape["max_len"])
        inp = make_row(shape, device, dtype)
        inp.update({k + "_pad": _pad(inp[k], lengths) for k in time_keys})
        inp.update(_packing(lengths, device))
        return inp

    register(
        BenchOp(
            name=name,
            shapes=shapes,
            make_inputs=make_inputs,
            ours=lambda inp: op(**args(inp), cu_seqlens=inp["cu_seqlens"]),
            reference=lambda inp: each_sequence(lambda s: ref(**s), args(inp), inp["cu_seqlens"], time_keys, -1),
            baselines={
                "one_seq": lambda inp: op(**args(inp)),
                "padded": lambda inp: op(**args(inp, "_pad")) * inp["mask"],
            },
            grad_inputs=grad_inputs + tuple(k + "_pad" for k in time_keys),
            **measures,
        )
    )


def _ss_row(shape, device, dtype):
    d, n, T = shape["dim"], shape["dstate"], shape["tokens"]
    return {
        "u": torch.randn(1, d, T, device=device, dtype=dtype),
        "delta": (0.5 * torch.randn(1, d, T, device=device)).to(dtype),
        "A": -torch.rand(d, n, device=device) - 0.5,
        "B": torch.randn(1, n, T, device=device, dtype=dtype),
        "C": torch.randn(1, n, T, device=device, dtype=dtype),
        "D": torch.randn(d, device=device),
        "z": torch.randn(1, d, T, device=device, dtype=dtype),
        "delta_bias": torch.rand(d, device=device) - 4.0,
        "delta_softplus": True,
    }


def _ss_bytes(shape, dtype):
    elem = dtype.itemsize
    d, n, T = shape["dim"], shape["dstate"], shape["tokens"]
    return (4 * d * T + 2 * n * T) * elem


_register_packed(
    "selective_scan_packed", "selective_scan",
    time_keys=("u", "delta", "B", "C", "z"),
    arg_keys=("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus"),
    make_row=_ss_row,
    shapes={
        "cpu": [{"tokens": 8192, "dim": 768, "dstate": 16, "max_len": 4096}],
        "cuda": [{"tokens": 32768, "dim": 2048, "dstate": 16, "max_len": 4096}],
    },
    grad_inputs=("u", "delta", "A", "B", "C", "D", "z", "delta_bias"),
    flops=lambda s: FLOPS_PER_ELEMENT * s["dim"] * s["tokens"] * s["dstate"],
    bytes=_ss_bytes,
    reference_shape=lambda s: {**s, "dim": min(s["dim"], 16), "tokens": min(s["tokens"], 600),
                               "max_len": min(s["max_len"], 256)},
    check_shape=lambda s: {**s, "dim": min(s["dim"], 32), "tokens": min(s["tokens"], 8192)},
)


def _ls_row(shape, device, dtype):
    d, T = shape["dim"], shape["tokens"]
    return {
        "a": (torch.rand(1, d, T, device=device) * 0.5 + 0.5).to(dtype),
        "b": torch.randn(1, d, T, device=device, dtype=dtype),
    }


_register_packed(
    "linear_scan_packed", "linear_scan",
    time_keys=("a", "b"),
    arg_keys=("a", "b"),
    make_row=_ls_row,
    shapes={
        "cpu": [{"tokens": 16384, "dim": 1024, "max_len": 4096}],
        "cuda": [{"tokens": 65536, "dim": 4096, "max_len": 4096}],
    },
    grad_inputs=("a", "b"),
    flops=lambda s: 2.0 * s["dim"] * s["tokens"],
    bytes=lambda s, dtype: 3 * s["dim"] * s["tokens"] * dtype.itemsize,
    bwd_factor=5.0 / 3.0,
    reference_shape=lambda s: {**s, "dim": min(s["dim"], 8), "tokens": min(s["tokens"], 4096),
                               "max_len": min(s["max_len"], 1024)},
    check_shape=lambda s: {**s, "dim": min(s["dim"], 64), "tokens": min(s["tokens"], 16384)},
)
