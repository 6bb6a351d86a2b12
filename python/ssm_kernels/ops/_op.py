"""Calling the compiled ops by their schema: argument types, autograd and backward fakes follow
from the C++ declaration of each op (csrc/<op>/<op>_op.cpp), so Python repeats none of it.

Validation of shapes, dtypes, devices and values lives in C++ (it runs before any kernel, with a
ValueError/TypeError naming the argument). Python checks only what C++ cannot see: that each
argument has the schema's Python type (the dispatcher would otherwise raise an unnamed
RuntimeError) and that the tensors share one device the package has kernels for.

Conventions that let autograd be derived from the schemas (docs/design-notes.md):
  - `<op>_bwd` takes arguments named like `<op>_fwd`'s inputs, its outputs, or `d<output>`;
  - it returns `d<input>` for every differentiable input, shaped and typed like that input, and an
    empty [0] tensor (the dtype of the first tensor input) where an optional input is absent.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

import torch

_DEVICES = ("cpu", "cuda", "meta")


@functools.lru_cache(maxsize=None)
def _schema(name: str):
    return getattr(torch.ops.ssm_kernels, name).default._schema


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "Tensor":
        return isinstance(value, torch.Tensor)
    if kind == "Optional[Tensor]":
        return value is None or isinstance(value, torch.Tensor)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "ScalarType":
        return isinstance(value, torch.dtype)
    if kind == "List[float]":
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        )
    raise NotImplementedError(f"schema type {kind}")


_EXPECTED = {
    "Tensor": "a torch.Tensor",
    "Optional[Tensor]": "a torch.Tensor or None",
    "bool": "a bool",
    "int": "an int",
    "float": "a float",
    "ScalarType": "a torch.dtype",
    "List[float]": "a list of floats",
}


# (name, schema type) of each op's arguments, as plain strings that torch.compile traces through.
_ARGUMENTS = {
    s.name.split("::")[1]: tuple((a.name, str(a.type)) for a in s.arguments)
    for s in torch._C._jit_get_all_schemas()
    if s.name.startswith("ssm_kernels::")
}


def check_args(name: str, values: dict) -> list:
    """The op's arguments in schema order, after the type and device checks above."""
    args = []
    # The reference device is the first tensor's not on meta, so that the odd tensor is named.
    devices = [values[a].device for a, _ in _ARGUMENTS[name] if isinstance(values[a], torch.Tensor)]
    device = next((d for d in devices if d.type != "meta"), None)
    for arg, kind in _ARGUMENTS[name]:
        value = values[arg]
        if not _type_ok(kind, value):
            raise TypeError(f"{arg}: expected {_EXPECTED[kind]}, got {type(value).__name__}")
        if isinstance(value, torch.Tensor):
            # Checked here because a meta tensor among others routes the call to the fake.
            if device is None:
                device = value.device
                if device.type not in _DEVICES:
                    raise ValueError(f"{arg}: expected a cpu or cuda tensor, got device {device}")
            elif value.device != device:
                raise ValueError(f"{arg}: expected device {device}, got {value.device}")
        args.append(value)
    return args


def check_choice(name: str, value, choices) -> None:
    """A Python-level option (a string the op does not take) against its allowed values."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def call(name: str, **values):
    """torch.ops.ssm_kernels.<name> with the arguments given by their schema names."""
    return getattr(torch.ops.ssm_kernels, name)(*check_args(name, values))


def _tensor_typed(arg) -> bool:
    return str(arg.type) in ("Tensor", "Optional[Tensor]")


def register_autograd(fwd: str, bwd: str) -> None:
    """Autograd of `fwd` through `bwd`, wired by the naming conventions of this module."""
    fwd_schema, bwd_schema = _schema(fwd), _schema(bwd)
    in_names = [a.name for a in fwd_schema.arguments]
    out_names = [r.name for r in fwd_schema.returns]
    tensor_inputs = {a.name for a in fwd_schema.arguments if _tensor_typed(a)}
    bwd_names = [a.name for a in bwd_schema.arguments]
    required = {a.name for a in bwd_schema.arguments if str(a.type) == "Tensor"}
    saved = [n for n in bwd_names if n in tensor_inputs or n in out_names]
    plain = [n for n in bwd_names if n in in_names and n not in tensor_inputs]
    grad_of = {"d" + n: i for i, n in enumerate(out_names)}
    for n in bwd_names:
        if n not in saved and n not in plain and n not in grad_of:
            raise RuntimeError(f"{bwd}: argument {n} is neither an input, an output nor a gradient of {fwd}")
    returns = [r.name for r in bwd_schema.returns]

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        values = dict(zip(in_names, inputs))
        values.update(zip(out_names, outputs))
        ctx.save_for_backward(*[values[n] for n in saved])
        ctx.plain = {n: values[n] for n in plain}
        ctx.present = [values[n] is not None if n in tensor_inputs else False for n in in_names]
        # A required gradient that autograd leaves undefined is zeros like its output.
        ctx.outputs_like = [(o.shape, o.dtype, o.device) for o in outputs]

    def backward(ctx, *grads):
        values = dict(zip(saved, ctx.saved_tensors))
        values.update(ctx.plain)
        for gname, i in grad_of.items():
            g = grads[i]
            if g is None and gname in required:
                shape, dtype, device = ctx.outputs_like[i]
                g = torch.zeros(shape, dtype=dtype, device=device)
            values[gname] = g
        result = getattr(torch.ops.ssm_kernels, bwd)(*[values[n] for n in bwd_names])
        result = dict(zip(returns, result if isinstance(result, tuple) else (result,)))
        return tuple(result.get("d" + n) if present else None for n, present in zip(in_names, ctx.present))

    torch.library.register_autograd(f"ssm_kernels::{fwd}", backward, setup_context=setup_context)


def register_backward_fake(bwd: str, like: Optional[dict] = None) -> None:
    """The fake of `bwd`: each d<input> is shaped and typed like its input (see above), or like
    the argument `like[input]` names for an input the backward does not take."""
    schema = _schema(bwd)
    names = [a.name for a in schema.arguments]
    returns = [(like or {}).get(r.name[1:], r.name[1:]) for r in schema.returns]

    def fake(*args):
        values = dict(zip(names, args))
        ref = next(v for v in args if isinstance(v, torch.Tensor))
        out = tuple(
            values[n].new_empty(values[n].shape) if values[n] is not None else ref.new_empty((0,))
            for n in returns
        )
        return out if len(out) > 1 else out[0]

    torch.library.register_fake(f"ssm_kernels::{bwd}", fake)


def fake(name: str):
    """Decorator registering the forward's fake of op `name`. The function declares only the
    arguments it reads, by their schema names, so adding an argument to the op leaves it alone."""

    def decorate(fn):
        params = list(inspect.signature(fn).parameters)
        names = [a.name for a in _schema(name).arguments]
        # trailing arguments with a default (Tensor? x=None) may be left out of a call
        defaults = {a.name: a.default_value for a in _schema(name).arguments if a.has_default_value()}
        for p in params:
            if p not in names:
                raise RuntimeError(f"fake of {name}: {p} is not an argument of the op")

        def impl(*args, **kwargs):
            values = {**defaults, **dict(zip(names, args)), **kwargs}
            return fn(**{p: values[p] for p in params})

        torch.library.register_fake(f"ssm_kernels::{name}", impl)
        return fn

    return decorate


def register(fwd: str, bwd: str, like: Optional[dict] = None) -> None:
    """The backward's fake and the forward's autograd (the forward's fake is the op's own)."""
    register_backward_fake(bwd, like)
    register_autograd(fwd, bwd)
