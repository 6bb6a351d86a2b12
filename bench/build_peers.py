"""Builds the benchmark peers' CUDA extensions from the sources bench/fetch_peers.sh carried in
.peers/src, with torch.utils.cpp_extension.load (one build folder and one log per peer):

  selective_scan_cuda   mamba_ssm's Mamba-1 scan (csrc/selective_scan)
  causal_conv1d_cuda    causal-conv1d (csrc)

Only what `ssm-kernels bench` calls is compiled: the explicit template instantiations for the
benchmarked types (bf16 inputs; mamba_ssm's real float weights, causal-conv1d's bf16 weights,
the non-channel-last kernels) stay; every other instantiation line becomes an explicit
specialisation that raises, so the module still links and the unbuilt types fail loudly.
`--all-types` builds everything. The extension lands in .peers/build/<name>/<name>.so; put that
folder on PYTHONPATH to import it.

  python bench/build_peers.py [selective_scan_cuda] [causal_conv1d_cuda] [--jobs N] [--arch 9.0]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / ".peers" / "src"
BUILD = ROOT / ".peers" / "build"

NVCC_FLAGS = ["-O3", "-std=c++17", "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
              "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math", "--threads", "4"]

PEERS = {
    # name: (source dir under .peers/src, sources, instantiations kept: (function regex, args regex))
    "selective_scan_cuda": (
        "mamba/csrc/selective_scan",
        ["selective_scan.cpp",
         "selective_scan_fwd_fp32.cu", "selective_scan_fwd_fp16.cu", "selective_scan_fwd_bf16.cu",
         "selective_scan_bwd_fp32_real.cu", "selective_scan_bwd_fp32_complex.cu",
         "selective_scan_bwd_fp16_real.cu", "selective_scan_bwd_fp16_complex.cu",
         "selective_scan_bwd_bf16_real.cu", "selective_scan_bwd_bf16_complex.cu"],
        [(r"selective_scan_(fwd|bwd)_cuda", r"at::BFloat16,\s*float")],
    ),
    "causal_conv1d_cuda": (
        "causal-conv1d/csrc",
        ["causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu"],
        [(r"causal_conv1d_(fwd|bwd)_cuda", r"at::BFloat16,\s*at::BFloat16")],
    ),
}

# `template void name<args>(params);` on one line, as both peers write their instantiations.
INSTANTIATION = re.compile(r"^\s*template\s+void\s+(\w+)\s*<(.+)>\s*\((.*)\)\s*;\s*$")


def prune_source(text: str, keep: list[tuple[str, str]]) -> tuple[str, int, int]:
    """The source with every explicit instantiation not matched by keep (function regex, args
    regex) turned into an explicit specialisation that raises; (text, kept, stubbed)."""
    out, kept, stubbed = [], 0, 0
    for line in text.splitlines():
        m = INSTANTIATION.match(line)
        if not m:
            out.append(line)
            continue
        name, args, params = m.groups()
        if any(re.fullmatch(f, name) and re.fullmatch(a, args.strip()) for f, a in keep):
            out.append(line)
            kept += 1
        else:
            out.append(f"template<> void {name}<{args}>({params}) {{ "
                       f"TORCH_CHECK(false, \"{name}<{args}> was not built (bench/build_peers.py)\"); }}")
            stubbed += 1
    text = "\n".join(out) + "\n"
    if stubbed:
        text = "#include <c10/util/Exception.h>\n" + text
    return text, kept, stubbed


def prepare(name: str, all_types: bool) -> tuple[list[str], Path]:
    """Copies the peer's sources to .peers/build/<name>/src (pruned unless all_types)."""
    subdir, sources, keep = PEERS[name]
    src_dir = SRC / subdir
    if not src_dir.is_dir():
        raise SystemExit(f"{name}: no sources at {src_dir}; run bench/fetch_peers.sh where there is network")
    work = BUILD / name / "src"
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(src_dir, work)
    out = []
    for s in sources:
        path = work / s
        if path.suffix == ".cu" and not all_types:
            text, kept, stubbed = prune_source(path.read_text(), keep)
            path.write_text(text)
            print(f"{name}: {s}: {kept} instantiations built, {stubbed} stubbed", flush=True)
        out.append(str(path))
    return out, work


def build(name: str, arch: str, jobs: int, all_types: bool) -> int:
    import torch
    from torch.utils.cpp_extension import load

    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    os.environ["MAX_JOBS"] = str(jobs)
    sources, work = prepare(name, all_types)
    out_dir = BUILD / name
    t0 = time.time()
    print(f"{name}: torch {torch.__version__}, arch {arch}, {jobs} jobs, {len(sources)} sources", flush=True)
    load(name=name, sources=sources, extra_cflags=["-O3", "-std=c++17"], extra_cuda_cflags=NVCC_FLAGS,
         extra_include_paths=[str(work)], build_directory=str(out_dir), verbose=True, is_python_module=True)
    print(f"{name}: built in {time.time() - t0:.0f} s -> {out_dir}/{name}.so", flush=True)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peers", nargs="*", default=None, help=f"default: all ({', '.join(PEERS)})")
    parser.add_argument("--arch", default=os.environ.get("PEERS_ARCH", "9.0"), help="TORCH_CUDA_ARCH_LIST (default 9.0)")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", os.cpu_count() or 8)))
    parser.add_argument("--all-types", action="store_true", help="build every instantiation (slow)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # build in this process
    args = parser.parse_args(argv)
    names = args.peers or list(PEERS)
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        parser.error(f"unknown peer(s) {unknown}; known: {list(PEERS)}")
    if args.one or len(names) == 1:
        return build(names[0], args.arch, args.jobs, args.all_types)
    # Several peers: one process each, in parallel, each with its own log in its build folder;
    # the logs are printed one after the other at the end.
    BUILD.mkdir(parents=True, exist_ok=True)
    procs = {}
    for n in names:
        (BUILD / n).mkdir(parents=True, exist_ok=True)
        log = open(BUILD / n / "build.log", "w")
        cmd = [sys.executable, __file__, n, "--one", "--arch", args.arch, "--jobs", str(args.jobs)]
        cmd += ["--all-types"] if args.all_types else []
        procs[n] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
    status = 0
    for n, (p, log) in procs.items():
        rc = p.wait()
        log.close()
        print(f"===== {n}: exit {rc}", flush=True)
        sys.stdout.write((BUILD / n / "build.log").read_text())
        status = status or rc
    return status


if __name__ == "__main__":
    sys.exit(main())
