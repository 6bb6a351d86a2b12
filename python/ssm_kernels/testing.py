"""Shared by the tests and the benchmarks: one tolerance table, input factories, NaN-poisoning
of outputs, and helpers for opcheck, torch.compile, gradcheck and bad-input checks.

Tolerances are max relative errors, max|actual - expected| / max|expected|, against the float64
reference computed from the same (already rounded) inputs. They follow from the precision of the
output and of float32 accumulation: float32 at most 1e-4 (sums of up to ~1e5 terms at 6e-8 unit
roundoff, plus exp/log), float16/bfloat16 at most 1e-2 (one final rounding of 2^-8 for bfloat16,
with intermediate values stored in the input dtype). Set once; never loosened to pass a test.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterable, Optional, Sequence

import torch

TOLERANCES = {
    torch.float64: 1e-10,
    torch.complex128: 1e-10,
    torch.float32: 1e-4,
    torch.complex64: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}

DTYPE_IDS = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.complex64: "c64",
    torch.complex128: "c128",
}


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCES[dtype]


def dtype_id(dtype: torch.dtype) -> str:
    return DTYPE_IDS[dtype]


def devices() -> list[str]:
    """cpu always; cuda when a GPU is present and the build has CUDA kernels."""
    out = ["cpu"]
    if torch.cuda.is_available():
        import ssm_kernels

        if ssm_kernels.build_info()["cuda"]:
            out.append("cuda")
    return out


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| in float64 (NaN anywhere gives inf)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    wide = torch.complex128 if (actual.is_complex() or expected.is_complex()) else torch.float64
    a = actual.detach().to("cpu", wide)
    e = expected.detach().to("cpu", wide)
    if a.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all() or not torch.isfinite(e).all():
        return float("inf")
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    if scale == 0.0:
        return err
    return err / scale


def assert_close(actual, expected, dtype: torch.dtype, name: str = "output", tol: Optional[float] = None):
    """Assert rel_error(actual, expected) <= the tolerance of `dtype` (the computation's dtype)."""
    tol = tolerance(dtype) if tol is None else tol
    err = rel_error(actual, expected)
    assert err <= tol, f"{name}: max relative error {err:.3e} > {tol:.1e} ({dtype_id(dtype)})"


def make_tensor(shape: Sequence[int], dtype: torch.dtype, device="cpu", *, strided: bool = False,
                scale: float = 1.0, low: Optional[float] = None, high: Optional[float] = None,
                requires_grad: bool = False) -> torch.Tensor:
    """Random tensor; uniform in [low, high) when given, else normal * scale.

    With strided=True the result is a non-contiguous view (every other element of the last axis
    of a larger buffer) holding the same kind of values.
    """
    shape = tuple(shape)
    alloc = shape[:-1] + (2 * shape[-1],) if strided and len(shape) > 0 else shape
    real = dtype if not dtype.is_complex else (torch.float32 if dtype == torch.complex64 else torch.float64)
    gen_dtype = torch.float64 if real in (torch.float16, torch.bfloat16) else real
    if low is not None:
        base = torch.empty(alloc, dtype=gen_dtype, device=device).uniform_(low, high)
    else:
        base = torch.randn(alloc, dtype=gen_dtype, device=device) * scale
    if dtype.is_complex:
        imag = torch.randn(alloc, dtype=gen_dtype, device=device) * scale
        base = torch.complex(base, imag)
    base = base.to(dtype)
    t = base[..., ::2] if strided and len(shape) > 0 else base
    if requires_grad:
        t.requires_grad_(True)
    return t


def make_decays(shape: Sequence[int], dtype: torch.dtype, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of a linear recurrence h_t = a_t h_{t-1} + b_t, drawn in float64 then cast: decays
    |a| in [0.5, 1) with random signs (random phases when complex), b ~ N(0, 1)."""
    f64 = torch.float64
    mag = torch.rand(shape, dtype=f64, device=device) * 0.5 + 0.5
    if dtype.is_complex:
        a = mag * torch.exp(1j * torch.randn(shape, dtype=f64, device=device))
        b = torch.complex(torch.randn(shape, dtype=f64, device=device), torch.randn(shape, dtype=f64, device=device))
    else:
        a = torch.where(torch.rand(shape, dtype=f64, device=device) < 0.2, -mag, mag)
        b = torch.randn(shape, dtype=f64, device=device)
    return a.to(dtype), b.to(dtype)


def make_channel_last(t: torch.Tensor) -> torch.Tensor:
    """Same values, (B, D, L) view of a (B, L, D) contiguous buffer."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def seq_offsets(lengths: Sequence[int], device="cpu", dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """The cu_seqlens of packed sequences of these lengths: [0, l0, l0 + l1, ..., sum]."""
    ends = torch.tensor(list(lengths), dtype=torch.int64).cumsum(0).tolist()
    return torch.tensor([0] + ends, dtype=dtype, device=device)


def each_sequence(fn: Callable[[dict], torch.Tensor], args: dict, cu_seqlens: torch.Tensor,
                  token_keys: Sequence[str], dim: int) -> torch.Tensor:
    """fn(args) on each packed sequence alone, the outputs concatenated along `dim`: the tensors
    named in token_keys (None skipped) are cut along `dim` to the sequence's tokens, the other
    arguments passed whole. What a packed call must equal."""
    off = cu_seqlens.tolist()
    outs = []
    for start, end in zip(off[:-1], off[1:]):
        piece = dict(args)
        for k in token_keys:
            if args.get(k) is not None:
                piece[k] = args[k].narrow(dim, start, end - start)
        outs.append(fn(piece))
    return torch.cat(outs, dim)


def clone_leaf(t: Optional[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Optional[torch.Tensor]:
    """A detached copy that requires grad (keeps strides); None stays None."""
    if t is None:
        return None
    out = t.detach().clone() if dtype is None else t.detach().to(dtype)
    if out.is_floating_point() or out.is_complex():
        out.requires_grad_(True)
    return out


def clone_float_args(args: Iterable) -> tuple:
    """args with every floating-point tensor replaced by its clone_leaf (opcheck's inputs), the
    other arguments as they are."""
    return tuple(clone_leaf(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


@contextlib.contextmanager
def poisoned_outputs(enable: bool = True):
    """Within the block, every output the compiled ops allocate is filled with NaN first."""
    previous = torch.ops.ssm_kernels_test.set_poison_outputs(enable)
    try:
        yield
    finally:
        torch.ops.ssm_kernels_test.set_poison_outputs(previous)


@contextlib.contextmanager
def mamba3_gpu_code_on_cpu(reversed_order: bool = False):
    """Within the block, the CPU's mamba3 ops run the GPU's code (csrc/mamba3/mamba3_task.h: the
    scan's stages, the step's phases) with a GPU block's split of every phase emulated; with
    reversed_order, each stage's items one after the other from the last (the GPU runs them in any
    order), instead of in parallel from the first."""
    ops = torch.ops.ssm_kernels_test
    previous = ops.mamba3_cpu_task_kernels(True), ops.mamba3_cpu_task_order_reversed(reversed_order)
    try:
        yield
    finally:
        ops.mamba3_cpu_task_kernels(previous[0])
        ops.mamba3_cpu_task_order_reversed(previous[1])


def grads(outputs: Iterable[torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
          grad_outputs: Sequence[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """d(sum <output, grad_output>)/d input for each input that requires grad (None otherwise)."""
    outputs = list(outputs)
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    total = sum((o.to(g.dtype) * g).sum().real if o.is_complex() else (o.to(g.dtype) * g).sum()
                for o, g in zip(outputs, grad_outputs))
    got = torch.autograd.grad(total, wanted, allow_unused=True)
    it = iter(got)
    return [next(it) if (t is not None and t.requires_grad) else None for t in inputs]


def contiguous_copies(inputs: dict) -> dict:
    """inputs with every tensor replaced by a contiguous copy (same values, default strides)."""
    return {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def assert_runs_equal(run_a: Sequence, run_b: Sequence, names: Sequence[str],
                      grad_outputs: Optional[Sequence[torch.Tensor]] = None) -> None:
    """Two runs, each (leaves, *outputs), agree bitwise: every output, and the gradients of the
    leaves named under the same upstream gradients (all ones when none are given)."""
    leaves_a, *outs_a = run_a
    leaves_b, *outs_b = run_b
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        assert torch.equal(a, b), f"output {i}"
    if grad_outputs is None:
        grad_outputs = [torch.ones_like(o) for o in outs_a]
    grads_a = grads(outs_a, [leaves_a[k] for k in names], grad_outputs)
    grads_b = grads(outs_b, [leaves_b[k] for k in names], grad_outputs)
    for name, a, b in zip(names, grads_a, grads_b):
        assert torch.equal(a, b), name


def assert_grads_close(grads: dict, expected: dict, inputs: dict, dtype: torch.dtype) -> None:
    """Each gradient has its input's shape and dtype and is close to the expected one."""
    for name, g in grads.items():
        assert g.shape == inputs[name].shape and g.dtype == inputs[name].dtype, name
        assert_close(g, expected[name], dtype, f"d{name}")


def run_opcheck(op, args: tuple, kwargs: Optional[dict] = None) -> None:
    """torch.library.opcheck with every test (schema, fake, autograd registration, AOT dispatch)."""
    torch.library.opcheck(op, args, kwargs or {})


def check_compile(fn: Callable, *args, dtype: torch.dtype = torch.float32, **kwargs) -> None:
    """torch.compile(fullgraph=True) of fn runs and agrees with eager mode."""
    torch._dynamo.reset()
    eager = fn(*args, **kwargs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args, **kwargs)
    eager = eager if isinstance(eager, (tuple, list)) else (eager,)
    compiled = compiled if isinstance(compiled, (tuple, list)) else (compiled,)
    for i, (a, b) in enumerate(zip(compiled, eager)):
        assert_close(a, b, dtype, name=f"compiled output {i}")


def check_compile_over_lengths(fn: Callable, args: Sequence, new_cu_seqlens: Sequence[torch.Tensor]) -> None:
    """fn (whose last argument is cu_seqlens) compiles with fullgraph=True and agrees with eager
    mode; compiled once, it gives eager mode's results bitwise for each of new_cu_seqlens (other
    lengths, same count) without recompiling."""
    import torch._dynamo.testing

    check_compile(fn, *args)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    compiled(*args)
    for cu_seqlens in new_cu_seqlens:
        call = (*args[:-1], cu_seqlens)
        got, want = compiled(*call), fn(*call)
        got = got if isinstance(got, (tuple, list)) else (got,)
        want = want if isinstance(want, (tuple, list)) else (want,)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert counter.frame_count == 1


def check_gradcheck(fn: Callable, inputs: Sequence, **kwargs) -> None:
    assert torch.autograd.gradcheck(fn, tuple(inputs), **kwargs)


@contextlib.contextmanager
def one_thread():
    """Runs the block on one CPU thread (also what a long float64 reference loop of tiny ops
    wants: no thread-pool synchronisation per op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def assert_deterministic(run: Callable[[], Sequence[torch.Tensor]]) -> None:
    """run() returns the same tensors bitwise: run twice, and once on one CPU thread (a different
    split of the work, which a reduction in a fixed order does not see)."""
    first, again = run(), run()
    with one_thread():
        single = run()
    for i, (a, b, c) in enumerate(zip(first, again, single)):
        assert torch.equal(a, b), f"result {i} differs between runs"
        assert torch.equal(a, c), f"result {i} differs on one thread"


def assert_rejects_bad_cu_seqlens(call: Callable, cu_seqlens: torch.Tensor, batch2: dict,
                                  takes_seq_idx: bool = True) -> None:
    """call(**overrides) raises, naming cu_seqlens, for offsets that do not start at 0, decrease, do
    not end at seqlen, have a float dtype or sit on another device, for inputs of batch 2
    (`batch2`: the overrides that double the batch), and for seq_idx given too (where the op takes
    it). cu_seqlens: the
    valid offsets of a call with total length 40."""
    cu, device = cu_seqlens, cu_seqlens.device
    assert int(cu[-1]) == 40, "the bad offsets below are written for seqlen 40"
    assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu + 1)
    assert_raises_naming(ValueError, "cu_seqlens", call,
                         cu_seqlens=torch.tensor([0, 20, 10, 40], dtype=torch.int32, device=device))
    assert_raises_naming(ValueError, "cu_seqlens", call,
                         cu_seqlens=torch.tensor([0, 10, 39], dtype=torch.int32, device=device))
    assert_raises_naming(TypeError, "cu_seqlens", call, cu_seqlens=cu.float())
    if device.type == "cpu":
        assert_raises_naming(ValueError, "cu_seqlens", call, cu_seqlens=cu.to("meta"))
    assert_raises_naming(ValueError, "cu_seqlens", call, **batch2)
    if takes_seq_idx:
        assert_raises_naming(ValueError, "cu_seqlens", call, seq_idx=torch.zeros(1, 40, dtype=torch.int32, device=device))


def assert_raises_naming(exc_types, argname: str, fn: Callable, *args, **kwargs) -> str:
    """fn(*args, **kwargs) raises one of exc_types with a message naming `argname`."""
    try:
        fn(*args, **kwargs)
    except exc_types as exc:
        msg = str(exc)
        assert argname in msg, f"error message does not name {argname!r}: {msg}"
        return msg
    raise AssertionError(f"expected {exc_types} naming {argname!r}, nothing was raised")


def one_bad_argument(valid: dict, **bad_values: Sequence) -> list:
    """pytest params (kwargs, name) of a constructor's argument checks: the arguments `valid`, which
    build, with the one argument `name` replaced by each of its bad values (the error must name
    it); ids `name=value`."""
    import pytest  # only the tests call this; the package does not depend on pytest

    def case_id(name, value):
        return f"{name}={value!r}" if isinstance(value, (int, float, str, tuple)) else name

    return [pytest.param({**valid, name: value}, name, id=case_id(name, value))
            for name, values in bad_values.items() for value in values]


def params_float64(module: torch.nn.Module, device=None) -> dict:
    """Float64 leaf copies of a module's parameters, by name (on `device`, default their own)."""
    return {n: p.detach().to(device or p.device, torch.float64).requires_grad_(True)
            for n, p in module.named_parameters()}


def check_module_matches_reference(module: torch.nn.Module, x: torch.Tensor, reference: Callable,
                                   ref_device=None) -> None:
    """module(x) and the gradients of its parameters and of x equal `reference(params64, x64)`, a
    float64 formulation fed float64 copies of the weights and input (on ref_device, default x's)."""
    out = module(x)
    p64 = params_float64(module, ref_device)
    x64 = x.detach().to(ref_device or x.device, torch.float64).requires_grad_(True)
    out64 = reference(p64, x64)
    assert_close(out, out64, x.dtype)
    g = torch.randn_like(out64)
    out.backward(g.to(out.device, out.dtype))
    out64.backward(g)
    for name, param in module.named_parameters():
        assert_close(param.grad, p64[name].grad, x.dtype, name=f"grad {name}")
    assert_close(x.grad, x64.grad, x.dtype, name="grad input")


def check_state_dict_layout(module: torch.nn.Module, shapes: dict) -> None:
    """module's state_dict has exactly these names and shapes, and loads any tensors of them."""
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes
    sd = {k: torch.randn(s) for k, s in shapes.items()}
    module.load_state_dict(sd, strict=True)
    for k, v in module.state_dict().items():
        assert torch.equal(v, sd[k]), k


def check_loads_peer_weights(module: torch.nn.Module, peer: torch.nn.Module, x: torch.Tensor, name: str) -> None:
    """module takes peer's state_dict as it is (strict) and then computes what peer computes."""
    module.load_state_dict(peer.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(module(x), peer(x), x.dtype, name=f"vs {name}")


def check_two_pieces_equal_one_pass(module: torch.nn.Module, x: torch.Tensor, split: int,
                                    dtype: torch.dtype = torch.float32) -> None:
    """A Mamba-style block run on x[:, :split] then x[:, split:] with the carried (conv, ssm)
    states gives the one-pass output, final states and every gradient (x requires grad)."""
    full, conv_full, ssm_full = module(x, return_final_states=True)
    g = torch.randn_like(full)
    full.backward(g)
    grads_full = [p.grad.clone() for p in module.parameters()] + [x.grad.clone()]
    module.zero_grad()
    x.grad = None
    y1, c1, s1 = module(x[:, :split], return_final_states=True)
    y2, c2, s2 = module(x[:, split:], conv_state=c1, ssm_state=s1, return_final_states=True)
    pieces = torch.cat([y1, y2], dim=1)
    assert_close(pieces, full, dtype, name="pieces output")
    assert_close(c2, conv_full, dtype, name="conv_state")
    assert_close(s2, ssm_full, dtype, name="ssm_state")
    pieces.backward(g)
    for i, (a, b) in enumerate(zip([p.grad for p in module.parameters()] + [x.grad], grads_full)):
        assert_close(a, b, dtype, name=f"grad {i} through carried states")


def broadcast_pair_shapes(batch: Sequence[int], pattern: str, N: int) -> tuple[tuple, tuple]:
    """Shapes of the (v, second operand) pair of the S4 kernels (cauchy's w, log_vandermonde's x)
    for a batch shape and a broadcast pattern: "none"; "v-bcast" (one v for every batch entry);
    "w-bcast" / "x-bcast" (one second operand); "mixed" (both broadcast, over different axes,
    and v over N)."""
    full = (*batch, N)
    if pattern == "none":
        return full, full
    if pattern == "v-bcast":
        return (N,), full
    if pattern in ("w-bcast", "x-bcast"):
        return full, (1,) * len(batch) + (N,)
    if pattern == "mixed":
        vb = tuple(1 if i == 0 else s for i, s in enumerate(batch))
        ob = tuple(s if i == 0 else 1 for i, s in enumerate(batch))
        return (*vb, 1), (*ob, N)
    raise ValueError(f"pattern: unknown broadcast pattern {pattern!r}")


def broadcast_case_id(N: int, L: int, batch: Sequence[int], pattern: str, dtype: torch.dtype, symmetric: bool,
                      strided: bool) -> str:
    """Test id of an S4 kernel case (cauchy, log_vandermonde)."""
    b = "x".join(map(str, batch)) or "scalar"
    return (f"N{N}-L{L}-B{b}-{pattern}-{dtype_id(dtype)}-{'sym' if symmetric else 'nosym'}"
            + ("-strided" if strided else ""))


@dataclasses.dataclass
class InferenceParams:
    """mamba_ssm.utils.generation.InferenceParams: the fields its mixers read."""
    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    key_value_memory_dict: dict = dataclasses.field(default_factory=dict)


def check_inference_params_decoding(module: torch.nn.Module, x: torch.Tensor, prompt: int) -> InferenceParams:
    """A mixer fed through mamba_ssm's generation protocol (a prompt of `prompt` tokens, then one
    token per call) gives its full-sequence output. Returns the params it filled."""
    seqlen = x.shape[1]
    with torch.no_grad():
        full = module(x)
        params = InferenceParams(max_seqlen=seqlen, max_batch_size=x.shape[0])
        outs = [module(x[:, :prompt], inference_params=params)]
        for t in range(prompt, seqlen):
            params.seqlen_offset = t
            outs.append(module(x[:, t:t + 1], inference_params=params))
    assert_close(torch.cat(outs, dim=1), full, x.dtype)
    return params
