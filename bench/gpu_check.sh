#!/usr/bin/env bash
# On a GPU machine, in one go (under 10 minutes on an H100 with 16 cores): build for the local
# arch, run every test on CUDA, compute-sanitizer memcheck/racecheck on a small CUDA subset, and
# `ssm-kernels bench --device cuda`. Logs and JSON go to $OUT (or bench/out/) for bench/results/.
#
#   bash bench/gpu_check.sh
#
# A GPU machine without network access: run `bash bench/fetch_peers.sh` first where pip works
# and bring the .peers folder along (mamba-ssm's Triton kernels as peers, expecttest for opcheck).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
if [ -d .peers/site ]; then
  export PYTHONPATH="$PWD/.peers/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-16}"
export SSM_KERNELS_CUDA=1
status=0

step() { echo "== $* ($(date +%H:%M:%S))" | tee -a "$OUT/summary.txt"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/device.txt"

step "build (arch $TORCH_CUDA_ARCH_LIST)"
SSM_KERNELS_PTXAS_VERBOSE=1 "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -n 80 "$OUT/build.log"; echo "build failed" | tee -a "$OUT/summary.txt"; exit 1; }
grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20 > "$OUT/ptxas-summary.txt"
"$PY" -m ssm_kernels info | tee "$OUT/info.txt"

step "tests (cpu and cuda)"
# No -x: a first run on a new GPU should report every failure in one go.
"$PY" -m pytest -q --maxfail=200 --junitxml="$OUT/tests.xml" tests > "$OUT/tests.log" 2>&1 || status=1
tail -n 30 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

step "compute-sanitizer (memcheck, racecheck) on a small CUDA subset"
SAN_ARGS=(tests -k "cuda and (opcheck or bad_inputs or L129 or L513 or (zero_structures and Q100)) and not compile")
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 3 --target-processes all \
    "$PY" -m pytest -q -x "${SAN_ARGS[@]}" > "$OUT/sanitizer-$tool.log" 2>&1 || status=1
  tail -n 5 "$OUT/sanitizer-$tool.log" | tee -a "$OUT/summary.txt"
done

step "benchmarks"
"$PY" -m ssm_kernels bench --device cuda --json "$OUT/bench-cuda.json" --csv "$OUT/bench-cuda.csv" \
  > "$OUT/bench-cuda.txt" 2> "$OUT/bench-progress.log" || status=1
cat "$OUT/bench-cuda.txt"

step "done (status $status)"
exit $status
