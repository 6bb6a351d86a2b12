"""Packed variable-length sequences (cu_seqlens) in selective_scan and linear_scan: the packed call
on sequences summing to T tokens against the same op on one sequence of T tokens ("one_seq": the
cost of packing, target <= 10% more) and on the batch padded to the longest sequence, masked
("padded": what packing replaces; the padding ratio S * max_len / T is in the row's shape).

Lengths are drawn uniformly from [64, max_len] (seeded) until they sum to T (the last one cut)."""
import torch

import ssm_kernels
from ssm_kernels import reference

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
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    mask = torch.zeros(len(lengths), 1, max(lengths), device=device)
    for s, n in enumerate(lengths):
        mask[s, :, :n] = 1
    return {"cu_seqlens": cu, "mask": mask}


def _per_sequence(fn, inp: dict, time_keys, lengths: list):
    """fn on each sequence (tensors in time_keys cut along their last axis); outputs concatenated."""
    outs, start = [], 0
    for n in lengths:
        seq = {k: (v[..., start:start + n] if k in time_keys else v) for k, v in inp.items()}
        outs.append(fn(seq))
        start += n
    return torch.cat(outs, dim=-1)


SS_TIME = ("u", "delta", "B", "C", "z")
SS_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_softplus")


def _ss_inputs(shape, device, dtype):
    lengths = draw_lengths(shape["tokens"], shape["max_len"])
    d, n, T = shape["dim"], shape["dstate"], shape["tokens"]
    inp = {
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
    inp.update({k + "_pad": _pad(inp[k], lengths) for k in SS_TIME})
    inp.update(_packing(lengths, device))
    return inp


def _ss_args(inp, suffix=""):
    return {k: inp[k + suffix] if k in SS_TIME else inp[k] for k in SS_ARGS}


def _ss_reference(inp):
    lengths = (inp["cu_seqlens"][1:] - inp["cu_seqlens"][:-1]).tolist()
    return _per_sequence(lambda s: reference.selective_scan(**s), _ss_args(inp), SS_TIME, lengths)


def _ss_bytes(shape, dtype):
    elem = torch.empty((), dtype=dtype).element_size()
    d, n, T = shape["dim"], shape["dstate"], shape["tokens"]
    return (4 * d * T + 2 * n * T) * elem


register(
    BenchOp(
        name="selective_scan_packed",
        shapes={
            "cpu": [{"tokens": 8192, "dim": 768, "dstate": 16, "max_len": 4096}],
            "cuda": [{"tokens": 32768, "dim": 2048, "dstate": 16, "max_len": 4096}],
        },
        make_inputs=_ss_inputs,
        ours=lambda inp: ssm_kernels.selective_scan(**_ss_args(inp), cu_seqlens=inp["cu_seqlens"]),
        reference=_ss_reference,
        baselines={
            "one_seq": lambda inp: ssm_kernels.selective_scan(**_ss_args(inp)),
            "padded": lambda inp: ssm_kernels.selective_scan(**_ss_args(inp, "_pad")) * inp["mask"],
        },
        flops=lambda s: FLOPS_PER_ELEMENT * s["dim"] * s["tokens"] * s["dstate"],
        bytes=_ss_bytes,
        grad_inputs=("u", "delta", "A", "B", "C", "D", "z", "delta_bias") + tuple(k + "_pad" for k in SS_TIME),
        reference_shape=lambda s: {**s, "dim": min(s["dim"], 16), "tokens": min(s["tokens"], 600),
                                   "max_len": min(s["max_len"], 256)},
        check_shape=lambda s: {**s, "dim": min(s["dim"], 32), "tokens": min(s["tokens"], 8192)},
    )
)


def _ls_inputs(shape, device, dtype):
    lengths = draw_lengths(shape["tokens"], shape["max_len"])
    d, T = shape["dim"], shape["tokens"]
    inp = {
        "a": (torch.rand(1, d, T, device=device) * 0.5 + 0.5).to(dtype),
        "b": torch.randn(1, d, T, device=device, dtype=dtype),
    }
    inp.update({k + "_pad": _pad(inp[k], lengths) for k in ("a", "b")})
    inp.update(_packing(lengths, device))
    return inp


def _ls_reference(inp):
    lengths = (inp["cu_seqlens"][1:] - inp["cu_seqlens"][:-1]).tolist()
    return _per_sequence(lambda s: reference.linear_scan(s["a"], s["b"]), {"a": inp["a"], "b": inp["b"]},
                         ("a", "b"), lengths)


register(
    BenchOp(
        name="linear_scan_packed",
        shapes={
            "cpu": [{"tokens": 16384, "dim": 1024, "max_len": 4096}],
            "cuda": [{"tokens": 65536, "dim": 4096, "max_len": 4096}],
        },
        make_inputs=_ls_inputs,
        ours=lambda inp: ssm_kernels.linear_scan(inp["a"], inp["b"], cu_seqlens=inp["cu_seqlens"]),
        reference=_ls_reference,
        baselines={
            "one_seq": lambda inp: ssm_kernels.linear_scan(inp["a"], inp["b"]),
            "padded": lambda inp: ssm_kernels.linear_scan(inp["a_pad"], inp["b_pad"]) * inp["mask"],
        },
        flops=lambda s: 2.0 * s["dim"] * s["tokens"],
        bytes=lambda s, dtype: 3 * s["dim"] * s["tokens"] * torch.empty((), dtype=dtype).element_size(),
        grad_inputs=("a", "b", "a_pad", "b_pad"),
        bwd_factor=5.0 / 3.0,
        reference_shape=lambda s: {**s, "dim": min(s["dim"], 8), "tokens": min(s["tokens"], 4096),
                                   "max_len": min(s["max_len"], 1024)},
        check_shape=lambda s: {**s, "dim": min(s["dim"], 64), "tokens": min(s["tokens"], 16384)},
    )
)
