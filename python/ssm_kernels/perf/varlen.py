"""Packed variable-length sequences (cu_seqlens) for ssd_scan, causal_conv1d and fftconv.

Each row times the packed call on `seqs` sequences with lengths drawn in [minlen, maxlen] (a fixed
seed: the same lengths on every device) against two ways to get the same work done with the same
kernels: `single-seq`, one sequence of the same total length T (the cost floor: the target is
packed <= 1.1x of it), and `padded`, the sequences padded to the longest into a batch and the
outputs gathered back (masking the padding) (the target: packed faster by at least the padding
ratio, batch * longest / T, printed in the shape as `pad`).
"""
from __future__ import annotations

import random

import torch

import ssm_kernels
from ssm_kernels import reference

from ..testing import each_sequence, seq_offsets
from .registry import BenchOp, register


def lengths(shape) -> list[int]:
    rng = random.Random(shape.get("seed", 0))
    return [rng.randint(shape["minlen"], shape["maxlen"]) for _ in range(shape["seqs"])]


def _pad_index(lens, device):
    """(gather [S * longest] into cat(row, one zero slot), positions [T] of the tokens in the
    padded batch): the padding layout, built once (host lengths known to the baseline)."""
    longest, total = max(lens), sum(lens)
    gather, keep, start = [], [], 0
    for s, n in enumerate(lens):
        gather += list(range(start, start + n)) + [total] * (longest - n)
        keep += [s * longest + i for i in range(n)]
        start += n
    return (torch.tensor(gather, dtype=torch.int64, device=device),
            torch.tensor(keep, dtype=torch.int64, device=device))


def _to_padded(t, gather, seqs, dim):
    """[1, T, ...] (dim=1) or [1, D, T] (dim=2) -> the padded batch, zeros on padding."""
    row = t[0] if dim == 1 else t[0].transpose(0, 1)  # [T, ...]
    row = torch.cat([row, row.new_zeros((1,) + row.shape[1:])])[gather]  # [S * longest, ...]
    padded = row.view((seqs, -1) + row.shape[1:])
    return padded if dim == 1 else padded.transpose(1, 2)


def _from_padded(t, keep, dim):
    """The padded batch's outputs at the tokens, back to [1, T, ...] / [1, D, T]."""
    if dim == 1:
        return t.reshape((-1,) + t.shape[2:])[keep][None]
    return t.transpose(1, 2).reshape((-1, t.shape[1]))[keep].transpose(0, 1)[None]


def _packed_extras(shape, device):
    lens = lengths(shape)
    gather, keep = _pad_index(lens, device)
    return lens, {"cu_seqlens": seq_offsets(lens, device), "pad_gather": gather, "pad_keep": keep}


def _pad_ratio(shape) -> float:
    lens = lengths(shape)
    return len(lens) * max(lens) / sum(lens)


def _strip(inp):
    """The op's arguments: the inputs without the padding layout of the `padded` baseline."""
    return {k: v for k, v in inp.items() if not k.startswith("pad_")}


def _one_sequence(inp):
    """The op's arguments for the T packed tokens read as one sequence (no cu_seqlens)."""
    return {k: v for k, v in _strip(inp).items() if k != "cu_seqlens"}


def _register_packed(name, function, token_keys, token_dim, shapes, make_inputs, **measures):
    """Registers the packed-sequence benchmark of `function`: the packed call (ours), the float64
    reference on each sequence alone, and the two baselines with the same kernel: the T tokens as
    one sequence (`single-seq`) and the padded batch (`padded`), whose tensors in token_keys carry
    the tokens along axis token_dim. The shapes get their padding ratio `pad`."""
    op, ref = getattr(ssm_kernels, function), getattr(reference, function)

    def padded(inp):
        seqs = inp["cu_seqlens"].shape[0] - 1
        args = _one_sequence(inp)
        for k in token_keys:
            args[k] = _to_padded(inp[k], inp["pad_gather"], seqs, token_dim)
        return _from_padded(op(**args), inp["pad_keep"], token_dim)

    register(
        BenchOp(
            name=name,
            shapes={device: [{**s, "pad": round(_pad_ratio(s), 2)} for s in rows] for device, rows in shapes.items()},
            make_inputs=make_inputs,
            ours=lambda inp: op(**_strip(inp)),
            reference=lambda inp: each_sequence(lambda a: ref(**a), _one_sequence(inp), inp["cu_seqlens"],
                                                 token_keys, token_dim),
            baselines={"single-seq": lambda inp: op(**_one_sequence(inp)), "padded": padded},
            **measures,
        )
    )


def _ssd_inputs(shape, device, dtype):
    lens, extras = _packed_extras(shape, device)
    T, h, p, g, n = sum(lens), shape["nheads"], shape["headdim"], shape["groups"], shape["dstate"]
    return {
        "x": torch.randn(1, T, h, p, device=device, dtype=dtype),
        "dt": (torch.rand(1, T, h, device=device) * 0.1 + 0.001).to(dtype),
        "A": -torch.rand(h, device=device) * 2.0 - 0.1,
        "B": (torch.randn(1, T, g, n, device=device) * n**-0.5).to(dtype),
        "C": torch.randn(1, T, g, n, device=device, dtype=dtype),
        "chunk_size": shape["chunk"],
        **extras,
    }


def _ssd_flops(s):
    T = sum(lengths(s))
    return 2.0 * T * (s["groups"] * s["chunk"] * s["dstate"] + s["nheads"] * (s["chunk"] * s["headdim"] + 2 * s["headdim"] * s["dstate"]))


def _ssd_bytes(s, dtype):
    elem = dtype.itemsize
    T = sum(lengths(s))
    return elem * T * (2 * s["nheads"] * s["headdim"] + s["nheads"] + 2 * s["groups"] * s["dstate"])


_register_packed(
    "ssd-packed", "ssd_scan", token_keys=("x", "dt", "B", "C"), token_dim=1,
    shapes={
        "cpu": [{"seqs": 4, "minlen": 64, "maxlen": 1024, "nheads": 8, "headdim": 64, "dstate": 64, "groups": 1,
                 "chunk": 64}],
        "cuda": [{"seqs": 16, "minlen": 64, "maxlen": 4096, "nheads": 32, "headdim": 64, "dstate": 128, "groups": 1,
                  "chunk": 256}],
    },
    make_inputs=_ssd_inputs,
    flops=_ssd_flops,
    bytes=_ssd_bytes,
    grad_inputs=("x", "dt", "A", "B", "C"),
    reference_shape=lambda s: {**s, "seqs": min(s["seqs"], 3), "maxlen": min(s["maxlen"], 200),
                               "minlen": min(s["minlen"], 100), "nheads": min(s["nheads"], 4)},
    check_shape=lambda s: {**s, "seqs": min(s["seqs"], 3), "maxlen": min(s["maxlen"], 600), "nheads": min(s["nheads"], 8)},
)


def _conv_inputs(shape, device, dtype):
    lens, extras = _packed_extras(shape, device)
    d, w = shape["dim"], shape["width"]
    return {
        "x": torch.randn(1, d, sum(lens), device=device, dtype=dtype),
        "weight": torch.randn(d, w, device=device) / w**0.5,
        "bias": torch.randn(d, device=device),
        "activation": "silu",
        **extras,
    }


def _channel_bytes(s, dtype):
    """Read the [1, D, T] input once and write the output once."""
    return 2 * s["dim"] * sum(lengths(s)) * dtype.itemsize


def _register_channel_packed(name, function, token_key, sizes, make_inputs, **measures):
    """Registers the packed benchmark of a channel-first op, its tokens along the last axis of the
    [1, D, T] input token_key. Both such ops run on the same lengths (8 sequences on CPU, 16 on
    CUDA, each of 64 to 4096 tokens) with their own other sizes[device], and move _channel_bytes."""
    lengths_on = {"cpu": {"seqs": 8, "minlen": 64, "maxlen": 4096}, "cuda": {"seqs": 16, "minlen": 64, "maxlen": 4096}}
    _register_packed(
        name, function, token_keys=(token_key,), token_dim=2,
        shapes={device: [{**lengths_on[device], **sizes[device]}] for device in lengths_on},
        make_inputs=make_inputs, bytes=_channel_bytes, **measures,
    )


_register_channel_packed(
    "causal_conv1d-packed", "causal_conv1d", "x",
    sizes={"cpu": {"dim": 512, "width": 4}, "cuda": {"dim": 4096, "width": 4}},
    make_inputs=_conv_inputs,
    flops=lambda s: 2.0 * s["dim"] * sum(lengths(s)) * s["width"],
    grad_inputs=("x", "weight", "bias"),
    check_shape=lambda s: {**s, "dim": min(s["dim"], 256)},
)


def _fft_inputs(shape, device, dtype):
    lens, extras = _packed_extras(shape, device)
    d, k = shape["dim"], shape["klen"]
    return {
        "u": torch.randn(1, d, sum(lens), device=device, dtype=dtype),
        "k": torch.randn(d, k, device=device) / k,
        "D": torch.randn(d, device=device),
        **extras,
    }


_register_channel_packed(
    "fftconv-packed", "fftconv", "u",
    sizes={"cpu": {"dim": 64, "klen": 256}, "cuda": {"dim": 768, "klen": 256}},
    make_inputs=_fft_inputs,
    flops=lambda s: 0.0,
    grad_inputs=("u", "k", "D"),
    reference_shape=lambda s: {**s, "dim": min(s["dim"], 8)},
    check_shape=lambda s: {**s, "dim": min(s["dim"], 16), "seqs": min(s["seqs"], 4)},
)
