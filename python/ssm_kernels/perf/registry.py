"""The benchmark registry: one BenchOp per op, registered by the modules of this package."""
from __future__ import annotations

import functools
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
    # On CUDA the float64 loop references are far too slow (and too large) at the GPU profile's
    # shapes: the forward is checked at check_shape(shape) instead, a cut of the shape with the
    # same options that still crosses the kernels' chunk boundaries (the reference runs on the
    # GPU there); gradients at reference_shape(check_shape(shape)). None: the full shape. On
    # CPU the forward is always checked at the benchmarked shape.
    check_shape: Optional[Callable[[dict], dict]] = None
    # Default: the functions of ssm_kernels and ssm_kernels.reference named `function` (default:
    # the benchmark's name), called with the inputs as keywords.
    function: Optional[str] = None
    ours: Optional[Callable[[Inputs], Any]] = None
    reference: Optional[Callable[[Inputs], Any]] = None

    def __post_init__(self):
        import ssm_kernels
        from ssm_kernels import reference

        function = self.function or self.name
        if self.ours is None:
            self.ours = functools.partial(_call_with, getattr(ssm_kernels, function))
        if self.reference is None:
            self.reference = functools.partial(_call_with, getattr(reference, function))


def _call_with(fn: Callable, inputs: Inputs) -> Any:
    return fn(**inputs)


REGISTRY: dict[str, BenchOp] = {}


def register(op: BenchOp) -> BenchOp:
    if op.name in REGISTRY:
        raise ValueError(f"benchmark {op.name!r} registered twice")
    REGISTRY[op.name] = op
    return op


def peer(module: str) -> Optional[Any]:
    """Import a peer library for comparison, or None when it is not installed or fails to load.

    A submodule whose package ``__init__`` fails (mamba_ssm from a source checkout on PYTHONPATH:
    its ``__init__`` imports the CUDA extension that was never built) is loaded through stand-in
    parent packages that skip the ``__init__`` files, so pure-Python and Triton submodules such as
    ``mamba_ssm.ops.triton.ssd_combined`` still serve as baselines.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except Exception:
        pass
    return _import_skipping_package_inits(module)


def _import_skipping_package_inits(module: str) -> Optional[Any]:
    import importlib
    import importlib.util
    import os
    import sys
    import types

    parts = module.split(".")
    top = parts[0]
    if len(parts) < 2 or top in sys.modules:
        return None

    def drop_package() -> None:
        # Also the submodules a failed import of the real package left behind: their parent
        # never finished loading.
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]

    try:
        spec = importlib.util.find_spec(top)
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    drop_package()
    path = list(spec.submodule_search_locations)[0]
    try:
        for depth in range(1, len(parts)):
            name = ".".join(parts[:depth])
            if depth > 1:
                path = os.path.join(path, parts[depth - 1])
            if not os.path.isdir(path):
                raise ImportError(f"{name}: no package directory at {path}")
            stand_in = types.ModuleType(name)
            stand_in.__path__ = [path]
            sys.modules[name] = stand_in
        return importlib.import_module(module)
    except Exception:
        drop_package()
        return None
