"""Runs the registered benchmarks: checks each op against its float64 reference at the shape,
then times ours and the baselines (forward, then forward+backward) and reports time, GB/s,
TFLOP/s, the fraction of the roofline measured in the same run, and speed-ups from the same run.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import testing
from .registry import REGISTRY, BenchOp


@dataclass
class Roofline:
    copy_bytes_per_s: float
    matmul_flops_per_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device, budget_s: float = 1.0, max_reps: int = 50,
            min_reps: int = 3) -> float:
    """Median seconds per call (CUDA events on GPU), after a warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, math.ceil(budget_s / max(first, 1e-6)))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_roofline(device: torch.device, dtype: torch.dtype) -> Roofline:
    """Copy bandwidth (read + write bytes) and matmul throughput, measured now on this device."""
    n = (64 << 20) if device.type == "cuda" else (16 << 20)
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda: dst.copy_(src), device, budget_s=0.5)
    m = 8192 if device.type == "cuda" else 1024
    mm_dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(m, m, device=device, dtype=mm_dtype)
    b = torch.randn(m, m, device=device, dtype=mm_dtype)
    t_mm = time_fn(lambda: a @ b, device, budget_s=0.5)
    return Roofline(copy_bytes_per_s=2 * n * 4 / t_copy, matmul_flops_per_s=2 * m**3 / t_mm)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _leaves(inputs: dict, names, dtype: Optional[torch.dtype] = None) -> dict:
    """Copy of inputs whose `names` are fresh leaves requiring grad (cast to dtype if given)."""
    out = dict(inputs)
    for name in names:
        if out.get(name) is not None:
            out[name] = testing.clone_leaf(out[name], dtype)
    return out


def _wide(t: torch.Tensor) -> torch.dtype:
    return torch.complex128 if t.is_complex() else torch.float64


def check_against_reference(op: BenchOp, inputs: dict, dtype: torch.dtype, backward: bool) -> tuple[bool, float]:
    """Max relative error of ours vs the float64 reference (outputs, and gradients if backward)."""
    names = op.grad_inputs if backward else ()
    ours_in = _leaves(inputs, names)
    ref_in = dict(inputs)
    for name in names:
        if ref_in.get(name) is not None:
            ref_in[name] = testing.clone_leaf(ref_in[name], _wide(ref_in[name]))
    with torch.set_grad_enabled(backward):
        ours = _as_tuple(op.ours(ours_in))
        ref = _as_tuple(op.reference(ref_in))
    worst = max(testing.rel_error(o, r) for o, r in zip(ours, ref))
    if backward:
        g_out = [torch.randn_like(r) for r in ref]
        g_ours = testing.grads(ours, [ours_in[n] for n in names], [g.to(o.dtype) for g, o in zip(g_out, ours)])
        g_ref = testing.grads(ref, [ref_in[n] for n in names], g_out)
        for a, b in zip(g_ours, g_ref):
            if a is not None and b is not None:
                worst = max(worst, testing.rel_error(a, b))
    return worst <= testing.tolerance(dtype), worst


def _fwd_bwd(fn: Callable, inputs: dict, names) -> Callable[[], Any]:
    leaves = _leaves(inputs, names)
    wanted = [leaves[n] for n in names if leaves.get(n) is not None]
    probe = _as_tuple(fn(leaves))
    g_out = [torch.randn_like(o) for o in probe if o.requires_grad]

    def run():
        outs = [o for o in _as_tuple(fn(leaves)) if o.requires_grad]
        torch.autograd.grad(outs, wanted, g_out, allow_unused=True)

    return run


def _shape_str(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def run_benchmarks(names, device: torch.device, dtype: Optional[torch.dtype] = None,
                   shapes: Optional[list[dict]] = None, backward: bool = True, budget_s: float = 1.0,
                   progress: bool = True) -> tuple[list[dict], Roofline]:
    profile = "cuda" if device.type == "cuda" else "cpu"
    selected = [REGISTRY[n] for n in names]
    roof_dtype = dtype or selected[0].dtypes[profile] if selected else torch.float32
    roof = measure_roofline(device, roof_dtype)
    rows = []
    for op in selected:
        op_dtype = dtype or op.dtypes[profile]
        op_shapes = shapes or op.shapes[profile]
        for shape in op_shapes:
            full = {**op.shapes[profile][0], **shape} if shapes else shape
            rows += _bench_one(op, full, device, op_dtype, roof, backward and bool(op.grad_inputs), budget_s, progress)
    return rows, roof


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _bench_one(op: BenchOp, shape: dict, device, dtype, roof: Roofline, backward: bool, budget_s: float,
               progress: bool) -> list[dict]:
    torch.manual_seed(0)
    inputs = op.make_inputs(shape, device, dtype)
    _log(progress, f"[{op.name}] checking the forward against the float64 reference at {_shape_str(shape)}")
    ok, err = check_against_reference(op, inputs, dtype, backward=False)
    grad_shape = op.reference_shape(shape) if (backward and op.reference_shape) else shape
    if ok and backward:
        grad_inputs = inputs if grad_shape == shape else op.make_inputs(grad_shape, device, dtype)
        _log(progress, f"[{op.name}] checking gradients against the float64 reference at {_shape_str(grad_shape)}")
        ok, grad_err = check_against_reference(op, grad_inputs, dtype, backward=True)
        err = max(err, grad_err)
    base = {"op": op.name, "shape": _shape_str(shape), "dtype": testing.dtype_id(dtype), "device": str(device),
            "check_error": err, "grad_check_shape": _shape_str(grad_shape) if backward else None}
    if not ok:
        _log(progress, f"[{op.name}] FAILED the reference check (max rel error {err:.2e}); not timed")
        return [{**base, "pass": "fwd", "impl": "ssm_kernels", "status": f"FAILED check ({err:.1e})"}]
    rows = []
    passes = [("fwd", False)] + ([("fwd+bwd", True)] if backward else [])
    flops = op.flops(shape)
    nbytes = op.bytes(shape, dtype)
    for pass_name, with_bwd in passes:
        factor = 1.0 + op.bwd_factor if with_bwd else 1.0
        impls = {"ssm_kernels": op.ours, **op.baselines}
        timings = {}
        for impl, fn in impls.items():
            skip = op.skip_baseline.get(impl)
            if skip is not None and skip(shape, pass_name):
                continue
            _log(progress, f"[{op.name}] {pass_name:8s} {impl:14s} {_shape_str(shape)}")
            try:
                call = _fwd_bwd(fn, inputs, op.grad_inputs) if with_bwd else (lambda fn=fn: fn(inputs))
                with torch.set_grad_enabled(with_bwd):
                    timings[impl] = time_fn(call, device, budget_s=budget_s)
            except Exception as exc:  # a peer that cannot run this case is reported, not fatal
                rows.append({**base, "pass": pass_name, "impl": impl, "status": f"error: {type(exc).__name__}: {exc}"[:120]})
        ref_t = timings.get("torch")
        for impl, t in timings.items():
            work = flops * factor
            traffic = nbytes * factor
            floor = max(traffic / roof.copy_bytes_per_s, work / roof.matmul_flops_per_s)
            rows.append({
                **base,
                "pass": pass_name,
                "impl": impl,
                "status": "ok",
                "ms": t * 1e3,
                "gbps": traffic / t / 1e9,
                "tflops": work / t / 1e12,
                "roofline_pct": 100.0 * floor / t,
                "speedup_vs_torch": (ref_t / t) if ref_t else None,
            })
    return rows


COLUMNS = [("op", 14), ("pass", 8), ("shape", 44), ("dtype", 5), ("impl", 14), ("ms", 10), ("gbps", 8),
           ("tflops", 8), ("roofline_pct", 7), ("speedup_vs_torch", 9), ("status", 8)]
HEADERS = {"ms": "time ms", "gbps": "GB/s", "tflops": "TFLOP/s", "roofline_pct": "%roof", "speedup_vs_torch": "vs torch"}


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "ms":
        return f"{value:.3f}"
    if key in ("gbps", "roofline_pct"):
        return f"{value:.1f}"
    if key == "tflops":
        return f"{value:.3f}"
    if key == "speedup_vs_torch":
        return f"{value:.2f}x"
    return str(value)


def format_table(rows: list[dict], roof: Roofline, device) -> str:
    lines = [f"device: {device}; roofline measured now: copy {roof.copy_bytes_per_s / 1e9:.1f} GB/s, "
             f"matmul {roof.matmul_flops_per_s / 1e12:.3f} TFLOP/s"]
    lines.append("  ".join(HEADERS.get(k, k).ljust(w) for k, w in COLUMNS))
    for r in rows:
        lines.append("  ".join(_fmt(k, r.get(k)).ljust(w) for k, w in COLUMNS))
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    import csv

    keys = [k for k, _ in COLUMNS] + ["device", "check_error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_json(rows: list[dict], roof: Roofline, device, path: str) -> None:
    import json
    import platform

    doc = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "roofline": {"copy_gbps": roof.copy_bytes_per_s / 1e9, "matmul_tflops": roof.matmul_flops_per_s / 1e12},
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def write_plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib)") from exc
    ours = [r for r in rows if r.get("impl") == "ssm_kernels" and r.get("speedup_vs_torch")]
    labels = [f"{r['op']} {r['pass']}\n{r['shape']}" for r in ours]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ours)), 4))
    ax.bar(range(len(ours)), [r["speedup_vs_torch"] for r in ours])
    ax.set_xticks(range(len(ours)), labels, rotation=30, ha="right", fontsize=7)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_ylabel("speed-up vs plain PyTorch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
