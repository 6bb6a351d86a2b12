#!/usr/bin/env bash
# On a bare GPU machine (no network; torch, python, nvcc, ninja, pytest-xdist, compute-sanitizer
# from the image), in one call of at most 8 minutes:
#   1. build the extension for the local arch with every core, and at the same time the peers
#      (mamba_ssm's selective_scan_cuda and causal-conv1d's extension, from .peers/src, see
#      bench/fetch_peers.sh and bench/build_peers.py) in the background;
#   2. the CUDA tests in parallel (pytest -n 8 -k cuda; the CPU tests run in CI, not here);
#   3. compute-sanitizer memcheck and racecheck on a small CUDA subset;
#   4. `ssm-kernels bench --device cuda` against plain PyTorch and the peers (mamba_ssm's CUDA
#      scan and Triton SSD / state update / Mamba-3 SISO, causal-conv1d, torch.fft) measured in
#      the same run, then `ssm-kernels profile mamba3 ssd` (each kernel's time: the Mamba-3 scan's
#      stages, the SSD's GEMMs), appended to bench.txt.
# Every step has its own `timeout`, so a slow step never costs the table. At most 8 files land
# in $OUT (default bench/out): summary.txt info.txt build.log peers.log tests.log sanitizer.log
# bench.json bench.txt.
#
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
NPROC="$(nproc)"
# Caps per step (seconds), and the whole run's: the bench runs before the sanitizer and each
# step gets at most what is left of T_TOTAL, so the table is never the step that is lost.
T_TOTAL="${T_TOTAL:-465}"
T_BUILD="${T_BUILD:-180}" T_PEERS="${T_PEERS:-240}" T_TESTS="${T_TESTS:-120}" T_BENCH="${T_BENCH:-180}" T_SAN="${T_SAN:-90}"
T_SAN_M3="${T_SAN_M3:-50}" T_PROF="${T_PROF:-40}"
T0=$(date +%s)
left() { echo $(( T_TOTAL - ($(date +%s) - T0) )); }
cap() { local want="$1" rest; rest=$(left); [ "$rest" -lt "$want" ] && want="$rest"; [ "$want" -lt 5 ] && want=5; echo "$want"; }
status=0
step() { echo "== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

# The local arch (9.0 -> 9.0a for the wgmma paths), unless given.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  [ "$cap" = "9.0" ] && cap=9.0a
  export TORCH_CUDA_ARCH_LIST="$cap"
fi
export SSM_KERNELS_CUDA=1

# Peers' Python (mamba_ssm ops, causal_conv1d, einops, expecttest) and built extensions.
for d in .peers/site .peers/src/mamba .peers/src/causal-conv1d .peers/build/selective_scan_cuda .peers/build/causal_conv1d_cuda; do
  export PYTHONPATH="$PWD/$d${PYTHONPATH:+:$PYTHONPATH}"
done
export PYTHONPATH="$PWD/python:$PYTHONPATH"

{
  step "device"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "arch $TORCH_CUDA_ARCH_LIST, $NPROC cores"
} > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt" >> "$OUT/summary.txt"

step "build (MAX_JOBS=$NPROC, arch $TORCH_CUDA_ARCH_LIST) and, in the background, the peers"
peers_pid=""
if [ -d .peers/src ]; then
  # sm_90 only; both peers in parallel, each with every core (ninja queues the rest).
  MAX_JOBS="$NPROC" timeout "$T_PEERS" "$PY" bench/build_peers.py --arch 9.0 --jobs "$NPROC" > "$OUT/peers.log" 2>&1 &
  peers_pid=$!
else
  echo "no .peers/src (run bench/fetch_peers.sh where there is network): peers not built" > "$OUT/peers.log"
fi
MAX_JOBS="$NPROC" SSM_KERNELS_PTXAS_VERBOSE=1 timeout "$(cap "$T_BUILD")" \
  "$PY" -m pip install -v --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  tail -n 60 "$OUT/build.log" >> "$OUT/summary.txt"
  step "build failed (exit $rc; 124 = over ${T_BUILD} s)"
  [ -n "$peers_pid" ] && wait "$peers_pid"
  exit 1
fi
{ echo "-- ptxas spills / stack frames (counts)"
  grep -E "spill|stack frame" "$OUT/build.log" | sort | uniq -c | sort -rn | head -20; } >> "$OUT/build.log"
"$PY" -m ssm_kernels info >> "$OUT/info.txt" 2>&1
step "built"

step "CUDA tests (pytest -n 8 -k cuda; the CPU tests run in CI)"
timeout "$(cap "$T_TESTS")" "$PY" -m pytest -q -n 8 -p no:cacheprovider --maxfail=200 -k cuda tests > "$OUT/tests.log" 2>&1 || status=1
tail -n 15 "$OUT/tests.log" >> "$OUT/summary.txt"

if [ -n "$peers_pid" ]; then
  step "waiting for the peers' build"
  # cut the peers' build at the time left before the bench (it has its own cap besides)
  ( sleep "$(( $(left) > 200 ? $(left) - 200 : 1 ))"; kill "$peers_pid" 2>/dev/null ) & killer=$!
  wait "$peers_pid"; rc=$?
  kill "$killer" 2>/dev/null
  echo "peers build: exit $rc (124 = over ${T_PEERS} s); $(grep -E 'built in|exit' "$OUT/peers.log" | tr '\n' ';')" >> "$OUT/summary.txt"
fi

step "benchmarks (rows land in bench.txt/bench.json as they are measured)"
# The bench stops starting new cases at its own time limit, inside the timeout; the default CUDA
# set is sized to finish in about 3 minutes. Its progress lines go to tests.log.
tb=$(cap "$T_BENCH")
# Every registered op, the ones with speed targets first and mamba3 last: its CUDA kernels have
# not run on a GPU before, and mamba_ssm's Triton baseline compiles on its first call, so a time
# limit reached there costs no other row.
FIRST="selective_scan ssd causal_conv1d fftconv linear_scan"
OPS=$("$PY" -c "from ssm_kernels.perf import REGISTRY; f='$FIRST'.split(); print(' '.join(f + [n for n in sorted(REGISTRY) if n not in f and n != 'mamba3'] + ['mamba3']))")
echo "===== ssm-kernels bench --device cuda $OPS (progress)" >> "$OUT/tests.log"
timeout "$tb" "$PY" -m ssm_kernels bench --device cuda --time-limit $(( tb > 60 ? tb - 25 : tb / 2 )) \
  --json "$OUT/bench.json" $OPS > "$OUT/bench.txt" 2>> "$OUT/tests.log" || status=1
cat "$OUT/bench.txt" >> "$OUT/summary.txt"

step "profile (where the time of the chunked scans goes, per kernel; appended to bench.txt)"
timeout "$(cap "$T_PROF")" "$PY" -m ssm_kernels profile mamba3 ssd --device cuda --rows 25 \
  >> "$OUT/bench.txt" 2>> "$OUT/tests.log" || status=1

step "compute-sanitizer memcheck + racecheck on a small CUDA subset"
# the bad-input checks (kernels must not run, or must fail cleanly) plus a few small forward and
# backward cases under both tools; then, with their own cap, memcheck and synccheck (the barriers
# between a block's phases) on small Mamba-3 cases (its CUDA kernels have not run on a GPU before)
SAN_K='cuda and not compile and (bad_inputs or op_checks or op_rechecks or bad_arguments or direct_op or (causal_conv1d_matches_reference and W4 and L127) or selective_scan_gradcheck or ssd_gradcheck)'
SAN_M3='cuda and not compile and ((mamba3_forward_backward and (L17 or L31)) or mamba3_step_equals_scan or varlen_mamba3_equals_the_op_per_sequence)'
: > "$OUT/sanitizer.log"
half=$(( $(cap "$T_SAN") / 2 ))
sanitize() {  # sanitize <tool> <-k selection> <seconds> <label>
  echo "===== $1 ($4)" >> "$OUT/sanitizer.log"
  timeout "$3" compute-sanitizer --tool "$1" --error-exitcode 3 --target-processes all \
    "$PY" -m pytest -q -x -p no:cacheprovider tests -k "$2" >> "$OUT/sanitizer.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  echo "$1 ($4): exit $rc (3 = errors found, 124 = over $3 s)" | tee -a "$OUT/sanitizer.log" >> "$OUT/summary.txt"
}
sanitize memcheck "$SAN_K" "$half" subset
sanitize racecheck "$SAN_K" "$half" subset
m3=$(( $(cap "$T_SAN_M3") / 2 ))
sanitize memcheck "$SAN_M3" "$m3" mamba3
sanitize synccheck "$SAN_M3" "$m3" mamba3

step "done (status $status)"
exit $status
