"""Command line: `ssm-kernels bench [OPS...]`, `ssm-kernels profile OPS...` and `ssm-kernels info`."""
from __future__ import annotations

import argparse
import sys

import torch


def _parse_shape(text: str) -> dict:
    shape = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--shape: expected key=value[,key=value...], got {text!r}")
        try:
            shape[key.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--shape: {key}: expected an integer, got {value!r}") from None
    return shape


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64,
          "complex64": torch.complex64, "complex128": torch.complex128}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssm-kernels", description="ssm-kernels: benchmarks and build info")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="time the ops against their baselines (after checking them)")
    bench.add_argument("ops", nargs="*", help="ops to run (default: all); see `ssm-kernels bench --list`")
    bench.add_argument("--list", action="store_true", help="list the registered ops and their shapes")
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    bench.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="input dtype (default per op and device)")
    bench.add_argument("--shape", action="append", type=_parse_shape, default=None,
                       help="override sizes, e.g. --shape batch=1,dim=768,seqlen=512 (repeatable)")
    bench.add_argument("--no-backward", action="store_true", help="time the forward only")
    bench.add_argument("--budget", type=float, default=None,
                       help="seconds of timing per row (default 1 on CPU, 0.2 on CUDA; a row stops at 4x)")
    bench.add_argument("--time-limit", type=float, default=None,
                       help="after this many seconds, report the remaining cases as skipped")
    bench.add_argument("--json", default=None, help="write the rows as JSON to this path (rewritten after each row)")
    bench.add_argument("--csv", default=None, help="write the rows as CSV to this path (rewritten after each row)")
    bench.add_argument("--plot", default=None, help="write a speed-up chart (PNG) to this path")
    bench.add_argument("--quiet", action="store_true", help="no progress display")
    profile = sub.add_parser("profile", help="where the ops' time goes: torch.profiler's table of their ops and kernels")
    profile.add_argument("ops", nargs="+", help="ops to profile, at their first benchmark shape for the device")
    profile.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    profile.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="input dtype (default per op and device)")
    profile.add_argument("--shape", type=_parse_shape, default=None, help="override sizes, as for bench")
    profile.add_argument("--no-backward", action="store_true", help="profile the forward only")
    profile.add_argument("--rows", type=int, default=20, help="rows of each table (default 20)")
    sub.add_parser("info", help="print the build (CUDA archs, CPU features, torch) and available backends")
    return parser


def cmd_info() -> int:
    import ssm_kernels

    info = ssm_kernels.build_info()
    print(f"ssm_kernels {ssm_kernels.__version__}")
    built = info.get("torch_built") or "unknown (no _build_config.py)"
    print(f"torch {info['torch']} (built against torch {built}; threads: {torch.get_num_threads()})")
    cuda_detail = f" (archs {' '.join(info['cuda_archs'])}" + (
        f", CUDA {info['cuda_version_built']})" if info.get("cuda_version_built") else ")")
    print(f"CUDA kernels built: {'yes' if info['cuda'] else 'no'}" + (cuda_detail if info["cuda"] else ""))
    # cpu_isa: the kernels' path on this CPU, picked at run time; cpu_isa_build: what the compiler
    # was allowed to assume (the baseline for a portable build).
    aten = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "unknown")()
    print(f"CPU kernels: {info.get('cpu_isa')} path (picked at run time; compiled for "
          f"{info.get('cpu_isa_build', 'unknown')}), OpenMP {'yes' if info.get('openmp') == '1' else 'no'}; "
          f"torch's own CPU kernels: {aten}")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"GPU visible: {gpu}")
    backends = ["cpu"] + (["cuda"] if info["cuda"] and torch.cuda.is_available() else [])
    print(f"backends available: {', '.join(backends)}")
    from .perf import REGISTRY

    print(f"benchmarks: {', '.join(sorted(REGISTRY))}")
    return 0


def cmd_bench(args) -> int:
    from .perf import REGISTRY
    from .perf.runner import Reporter, run_benchmarks, write_plot

    if args.list:
        for name, op in sorted(REGISTRY.items()):
            print(f"{name}: cpu {op.shapes['cpu']}; cuda {op.shapes['cuda']}")
        return 0
    names = args.ops or sorted(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        print(f"ssm-kernels bench: unknown op(s) {unknown}; known: {sorted(REGISTRY)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else None
    # Each row is printed as soon as it is measured, and the JSON/CSV files are rewritten after
    # every row: a run cut short keeps everything measured so far.
    reporter = Reporter(device, json_path=args.json, csv_path=args.csv)
    rows, roof = run_benchmarks(names, device, dtype=dtype, shapes=args.shape, backward=not args.no_backward,
                                budget_s=args.budget, progress=not args.quiet, reporter=reporter,
                                time_limit_s=args.time_limit)
    if args.plot:
        write_plot(rows, args.plot)
    failed = [r for r in rows if r.get("impl") == "ssm_kernels" and r.get("status", "").startswith("FAILED")]
    return 1 if failed else 0


def cmd_profile(args) -> int:
    from .perf import REGISTRY
    from .perf.runner import profile_op

    unknown = [n for n in args.ops if n not in REGISTRY]
    if unknown:
        print(f"ssm-kernels profile: unknown op(s) {unknown}; known: {sorted(REGISTRY)}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in args.ops:
        op = REGISTRY[name]
        shape = {**op.shapes[device.type][0], **(args.shape or {})}
        dtype = DTYPES[args.dtype] if args.dtype else op.dtypes[device.type]
        passes = "forward" if args.no_backward or not op.grad_inputs else "forward+backward"
        print(f"== {name} {passes} on {device} ({dtype}), {shape}", flush=True)
        print(profile_op(op, shape, device, dtype, backward=not args.no_backward, rows=args.rows), flush=True)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return cmd_info()
    if args.command == "profile":
        return cmd_profile(args)
    return cmd_bench(args)


if __name__ == "__main__":
    sys.exit(main())
