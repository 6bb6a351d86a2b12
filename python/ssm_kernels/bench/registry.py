"""The benchmark registry: one BenchOp per op, registered by the modules of this package."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

Inputs = dict  # keyword arguments of the op (tensors and flags)


@dataclass
class BenchOp:
    """What `ssm-kernels bench` needs to time one op.

    make_inputs(shape, device, dtype) -> Inputs: the op's keyword arguments at a shape, a dict of
        named sizes such as {"batch": 1, "dim": 1792, "seqlen": 2048, "width": 4}.
    ours(inputs) / reference(inputs) / baselines[name](inputs): run the op and return its
        output tensor or tuple of tensors. `reference` is the float64 definition; baselines are
        what a user would otherwise run (plain PyTorch always, peers when importable).
    flops(shape) and bytes(shape, dtype): the work and the minimum memory traffic of the forward;
        the backward is counted as `bwd_factor` times the forward.
    grad_inputs: names of the inputs differentiated in the forward+backward timing.
    """

    name: str
    shapes: dict[str, list[dict]]
    make_inputs: Callable[[dict, torch.device, torch.dtype], Inputs]
    ours: Callable[[Inputs], Any]
    reference: Callable[[Inputs], Any]
    baselines: dict[str, Callable[[Inputs], Any]]
    flops: Callable[[dict], float]
    bytes: Callable[[dict, torch.dtype], float]
    dtypes: dict[str, torch.dtype] = field(default_factory=lambda: {"cpu": torch.float32, "cuda": torch.bfloat16})
    grad_inputs: tuple[str, ...] = ()
    bwd_factor: float = 2.0
    # Baselines too slow to run: name -> predicate(shape, pass_name) that says skip, where
    # pass_name is "fwd" or "fwd+bwd".
    skip_baseline: dict[str, Callable[[dict, str], bool]] = field(default_factory=dict)
    # The forward is always checked against the reference at the benchmarked shape; where
    # autograd through the float64 reference is too slow there, gradients are checked at
    # reference_shape(shape) instead.
    reference_shape: Optional[Callable[[dict], dict]] = None


REGISTRY: dict[str, BenchOp] = {}


def register(op: BenchOp) -> BenchOp:
    if op.name in REGISTRY:
        raise ValueError(f"benchmark {op.name!r} registered twice")
    REGISTRY[op.name] = op
    return op


def peer(module: str) -> Optional[Any]:
    """Import a peer library for comparison, or None when it is not installed or fails to load."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception:
        return None
