"""Runs the registered benchmarks: checks each op against its float64 reference (at the
benchmarked shape on CPU, at a cut of it with the same options on CUDA, the reference running on
the GPU), then times the baselines and ours (forward, then forward+backward) and reports time,
GB/s, TFLOP/s, the fraction of the roofline and of the copy bandwidth measured in the same run,
and speed-ups over plain PyTorch and the peers from the same run. Each row is printed and
written (JSON/CSV rewritten) as soon as it is measured.

Timing: CPU, perf_counter around each call, median; CUDA, CUDA events around each call, median of
a bounded number of repetitions (budget per row), the inputs rotated over enough copies that the
L2 cannot serve them.
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


L2_FALLBACK_BYTES = 60 << 20  # H100/H200: 50-60 MB of L2


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_cache_bytes(device: torch.device) -> int:
    """The device's L2 size (torch.cuda.get_device_properties(...).L2_cache_size), else 60 MB."""
    if device.type == "cuda":
        try:
            size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
            if size > 0:
                return size
        except Exception:
            pass
    return L2_FALLBACK_BYTES


def rotation_copies(bytes_per_copy: int, l2_bytes: int, max_copies: int = 64,
                    max_total_bytes: Optional[int] = None) -> int:
    """How many copies of a case's inputs to cycle through so that the L2 cannot serve them:
    the smallest k with k * bytes_per_copy > 2 * l2_bytes, at most max_copies and at most what
    fits in max_total_bytes (and at least 1)."""
    if bytes_per_copy <= 0:
        return 1
    k = (2 * l2_bytes) // bytes_per_copy + 1
    if max_total_bytes is not None:
        k = min(k, max_total_bytes // bytes_per_copy)
    return int(max(1, min(k, max_copies)))


def tensor_bytes(inputs: dict) -> int:
    """Bytes of the distinct tensor storages among inputs' values."""
    seen, total = set(), 0
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            ptr = v.untyped_storage().data_ptr()
            key = (ptr, v.device) if ptr else id(v)  # meta tensors have no addresses
            if key not in seen:
                seen.add(key)
                total += v.untyped_storage().nbytes()
    return total


def copy_inputs(inputs: dict) -> dict:
    """A copy of inputs with every tensor cloned into fresh memory (other values shared)."""
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def time_fn(fn, device: torch.device, budget_s: float = 1.0, max_reps: int = 50, min_reps: int = 3,
            cap_s: Optional[float] = None, stats: Optional[dict] = None) -> float:
    """Median seconds per call after a warm-up call.

    fn is a callable or a list of callables (the same work on different copies of the inputs,
    called in turn so that a cache cannot serve the inputs). Repetitions: budget_s / (one call),
    clamped to [min_reps, max_reps], then cut so that they take at most cap_s (default
    4 * budget_s) but at least one. CUDA: one pair of CUDA events around each call, all
    recorded back to back and read after one synchronisation; CPU: perf_counter per call.
    stats, if given, receives reps, copies, min_s and max_s.
    """
    fns = list(fn) if isinstance(fn, (list, tuple)) else [fn]
    fns[0]()
    _sync(device)
    start = time.perf_counter()
    fns[-1]()
    _sync(device)
    first = max(time.perf_counter() - start, 1e-7)
    reps = int(min(max_reps, max(min_reps, math.ceil(budget_s / first))))
    cap = 4.0 * budget_s if cap_s is None else cap_s
    if reps * first > cap:
        reps = max(1, int(cap / first))
    times = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for i, (begin, end) in enumerate(events):
            begin.record()
            fns[i % len(fns)]()
            end.record()
        events[-1][1].synchronize()
        times = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fns[i % len(fns)]()
            times.append(time.perf_counter() - t0)
    if stats is not None:
        stats.update(reps=reps, copies=len(fns), min_s=min(times), max_s=max(times))
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


def profile_op(op: BenchOp, shape: dict, device: torch.device, dtype: torch.dtype, backward: bool = True,
               reps: int = 3, rows: int = 20) -> str:
    """Where ours spends its time at one shape: `reps` calls (forward, or forward+backward) under
    torch.profiler after a warm-up call, as torch.profiler's table of the ops and, on CUDA, of the
    kernels by their own time (every kernel of an op is a row: the Mamba-3 scan's stages, the SSD's
    GEMMs), the `rows` largest."""
    from torch.profiler import ProfilerActivity, profile

    inputs = op.make_inputs(shape, device, dtype)
    if backward and op.grad_inputs:
        run = _fwd_bwd(op.ours, inputs, op.grad_inputs)
    else:
        def run():
            return op.ours(inputs)
    run()
    _sync(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            run()
        _sync(device)
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def _shape_str(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def check_shapes(op: BenchOp, shape: dict, device: torch.device, backward: bool) -> tuple[dict, Optional[dict]]:
    """(forward check shape, gradient check shape or None): on CPU the forward is checked at
    the benchmarked shape; on CUDA at op.check_shape(shape). Gradients at reference_shape(...)
    of the forward check shape."""
    fwd = op.check_shape(shape) if (device.type == "cuda" and op.check_shape is not None) else shape
    if not backward:
        return fwd, None
    return fwd, (op.reference_shape(fwd) if op.reference_shape is not None else fwd)


class Reporter:
    """Prints each row as soon as it is measured (flushed) and rewrites the JSON (and CSV) files
    after every row, so that a run cut short leaves valid files holding every row measured so
    far. The JSON is replaced atomically (written next to it, then renamed)."""

    def __init__(self, device, json_path: Optional[str] = None, csv_path: Optional[str] = None,
                 stream=None, print_rows: bool = True):
        self.device = torch.device(device)
        self.json_path, self.csv_path = json_path, csv_path
        self.stream = stream
        self.print_rows = print_rows
        self.rows: list[dict] = []
        self.roof: Optional[Roofline] = None
        self.complete = False

    def _out(self, text: str) -> None:
        if self.print_rows:
            stream = self.stream or sys.stdout
            print(text, file=stream, flush=True)

    def start(self, roof: Roofline) -> None:
        self.roof = roof
        self._out(format_header(roof, self.device))
        self._write()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self._out(format_row(row))
        self._write()

    def finish(self) -> None:
        self.complete = True
        self._write()

    def _write(self) -> None:
        if self.json_path and self.roof is not None:
            write_json(self.rows, self.roof, self.device, self.json_path, complete=self.complete)
        if self.csv_path:
            write_csv(self.rows, self.csv_path)


def run_benchmarks(names, device: torch.device, dtype: Optional[torch.dtype] = None,
                   shapes: Optional[list[dict]] = None, backward: bool = True, budget_s: Optional[float] = None,
                   progress: bool = True, reporter: Optional[Reporter] = None,
                   time_limit_s: Optional[float] = None) -> tuple[list[dict], Roofline]:
    """Checks and times every (op, shape); rows go to reporter.add as they are measured.
    time_limit_s: once this many seconds have passed, the remaining cases are reported as
    skipped instead of run."""
    t_start = time.perf_counter()
    device = torch.device(device)
    profile = "cuda" if device.type == "cuda" else "cpu"
    if budget_s is None:
        budget_s = DEFAULT_BUDGET_S[profile]
    selected = [REGISTRY[n] for n in names]
    roof_dtype = (dtype or selected[0].dtypes[profile]) if selected else torch.float32
    _log(progress, f"measuring the roofline (copy bandwidth, matmul) on {device}")
    roof = measure_roofline(device, roof_dtype)
    if reporter is not None:
        reporter.start(roof)
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if reporter is not None:
            reporter.add(row)

    for op in selected:
        op_dtype = dtype or op.dtypes[profile]
        op_shapes = shapes or op.shapes[profile]
        for shape in op_shapes:
            full = {**op.shapes[profile][0], **shape} if shapes else shape
            if time_limit_s is not None and time.perf_counter() - t_start > time_limit_s:
                _log(progress, f"[{op.name}] skipped: past the time limit of {time_limit_s:.0f} s")
                emit({"op": op.name, "shape": _shape_str(full), "dtype": testing.dtype_id(op_dtype),
                      "device": str(device), "pass": "-", "impl": "ssm_kernels", "status": "skipped: time limit"})
                continue
            _bench_one(op, full, device, op_dtype, roof, backward and bool(op.grad_inputs), budget_s, progress, emit)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if reporter is not None:
        reporter.finish()
    return rows, roof


DEFAULT_BUDGET_S = {"cpu": 1.0, "cuda": 0.2}
# At most this many bytes (and this fraction of the free device memory) for the rotated copies.
ROTATION_MAX_BYTES = 4 << 30


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _is_peer(impl: str) -> bool:
    return impl != "ssm_kernels" and not impl.startswith("torch")


def _rotation_count(inputs: dict, device: torch.device, backward: bool) -> int:
    """1 on CPU (its timing keeps one set of inputs); on CUDA enough copies to defeat the L2."""
    if device.type != "cuda":
        return 1
    per_copy = tensor_bytes(inputs) * (2 if backward else 1)  # fwd+bwd also clones leaves
    budget = ROTATION_MAX_BYTES
    try:
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 4)
    except Exception:
        pass
    return rotation_copies(per_copy, l2_cache_bytes(device), max_total_bytes=budget)


def _bench_one(op: BenchOp, shape: dict, device, dtype, roof: Roofline, backward: bool, budget_s: float,
               progress: bool, emit: Callable[[dict], None]) -> None:
    torch.manual_seed(0)
    fwd_shape, grad_shape = check_shapes(op, shape, device, backward)
    check_inputs = op.make_inputs(fwd_shape, device, dtype)
    _log(progress, f"[{op.name}] checking the forward against the float64 reference at {_shape_str(fwd_shape)}")
    ok, err = check_against_reference(op, check_inputs, dtype, backward=False)
    if ok and backward:
        grad_inputs = check_inputs if grad_shape == fwd_shape else op.make_inputs(grad_shape, device, dtype)
        _log(progress, f"[{op.name}] checking gradients against the float64 reference at {_shape_str(grad_shape)}")
        ok, grad_err = check_against_reference(op, grad_inputs, dtype, backward=True)
        err = max(err, grad_err)
        del grad_inputs
    del check_inputs
    base = {"op": op.name, "shape": _shape_str(shape), "dtype": testing.dtype_id(dtype), "device": str(device),
            "check_error": err, "check_shape": _shape_str(fwd_shape),
            "grad_check_shape": _shape_str(grad_shape) if backward else None}
    if not ok:
        _log(progress, f"[{op.name}] FAILED the reference check (max rel error {err:.2e}); not timed")
        emit({**base, "pass": "fwd", "impl": "ssm_kernels", "status": f"FAILED check ({err:.1e})"})
        return
    torch.manual_seed(0)
    inputs = op.make_inputs(shape, device, dtype)
    passes = [("fwd", False)] + ([("fwd+bwd", True)] if backward else [])
    flops = op.flops(shape)
    nbytes = op.bytes(shape, dtype)
    copies = _rotation_count(inputs, device, backward)
    input_sets = [inputs] + [copy_inputs(inputs) for _ in range(copies - 1)]
    # Baselines first and ours last, so that every row can be printed as soon as it is measured
    # with its ratios against plain PyTorch and the peers timed in the same run.
    impls = {**op.baselines, "ssm_kernels": op.ours}
    for pass_name, with_bwd in passes:
        factor = 1.0 + op.bwd_factor if with_bwd else 1.0
        work, traffic = flops * factor, nbytes * factor
        timings: dict[str, float] = {}
        for impl, fn in impls.items():
            skip = op.skip_baseline.get(impl)
            if skip is not None and skip(shape, pass_name):
                continue
            _log(progress, f"[{op.name}] {pass_name:8s} {impl:14s} {_shape_str(shape)} ({len(input_sets)} input copies)")
            stats: dict = {}
            try:
                with torch.set_grad_enabled(with_bwd):
                    if with_bwd:
                        calls = [_fwd_bwd(fn, inp, op.grad_inputs) for inp in input_sets]
                    else:
                        calls = [lambda fn=fn, inp=inp: fn(inp) for inp in input_sets]
                    t = time_fn(calls, device, budget_s=budget_s, stats=stats)
                del calls
            except Exception as exc:  # a peer that cannot run this case is reported, not fatal
                emit({**base, "pass": pass_name, "impl": impl,
                      "status": f"error: {type(exc).__name__}: {exc}"[:160]})
                continue
            timings[impl] = t
            torch_t = timings.get("torch")
            floor = max(traffic / roof.copy_bytes_per_s, work / roof.matmul_flops_per_s)
            row = {
                **base,
                "pass": pass_name,
                "impl": impl,
                "status": "ok",
                "ms": t * 1e3,
                "gbps": traffic / t / 1e9,
                "tflops": work / t / 1e12,
                "roofline_pct": 100.0 * floor / t,
                # the time a device-to-device copy of the op's minimum traffic takes (measured in
                # this run) over the op's time
                "copy_pct": 100.0 * (traffic / roof.copy_bytes_per_s) / t,
                "speedup_vs_torch": (torch_t / t) if (torch_t and impl != "torch") else (1.0 if impl == "torch" else None),
                "reps": stats.get("reps"),
                "copies": stats.get("copies"),
            }
            if impl == "ssm_kernels":
                peers = {k: v / t for k, v in timings.items() if _is_peer(k)}
                row["speedup_vs_peers"] = peers or None
                row["speedup_vs_peer"] = max(peers.values()) if peers else None
                row["best_peer"] = max(peers, key=peers.get) if peers else None
            emit(row)


COLUMNS = [("op", 14), ("pass", 8), ("shape", 44), ("dtype", 5), ("impl", 14), ("ms", 10), ("gbps", 8),
           ("tflops", 8), ("roofline_pct", 7), ("copy_pct", 7), ("speedup_vs_torch", 9),
           ("speedup_vs_peer", 9), ("status", 8)]
HEADERS = {"ms": "time ms", "gbps": "GB/s", "tflops": "TFLOP/s", "roofline_pct": "%roof", "copy_pct": "%copy",
           "speedup_vs_torch": "vs torch", "speedup_vs_peer": "vs peer"}


def _fmt(key: str, value) -> str:
    if value is None:
        return "-"
    if key == "ms":
        return f"{value:.3f}"
    if key in ("gbps", "roofline_pct", "copy_pct"):
        return f"{value:.1f}"
    if key == "tflops":
        return f"{value:.3f}"
    if key in ("speedup_vs_torch", "speedup_vs_peer"):
        return f"{value:.2f}x"
    return str(value)


def format_header(roof: Roofline, device) -> str:
    return "\n".join([
        f"device: {device}; roofline measured now: copy {roof.copy_bytes_per_s / 1e9:.1f} GB/s, "
        f"matmul {roof.matmul_flops_per_s / 1e12:.3f} TFLOP/s",
        "  ".join(HEADERS.get(k, k).ljust(w) for k, w in COLUMNS),
    ])


def format_row(row: dict) -> str:
    return "  ".join(_fmt(k, row.get(k)).ljust(w) for k, w in COLUMNS)


def format_table(rows: list[dict], roof: Roofline, device) -> str:
    return "\n".join([format_header(roof, device)] + [format_row(r) for r in rows])


CSV_KEYS = [k for k, _ in COLUMNS] + ["best_peer", "device", "check_error", "check_shape", "reps", "copies"]


def write_csv(rows: list[dict], path: str) -> None:
    import csv
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_KEYS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def write_json(rows: list[dict], roof: Roofline, device, path: str, complete: bool = True) -> None:
    """The whole document (device, roofline, rows so far), replaced atomically."""
    import json
    import os
    import platform

    device = torch.device(device)
    doc = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "roofline": {"copy_gbps": roof.copy_bytes_per_s / 1e9, "matmul_tflops": roof.matmul_flops_per_s / 1e12},
        "complete": complete,
        "rows": rows,
    }
    if device.type == "cuda":
        doc["l2_bytes"] = l2_cache_bytes(device)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


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
