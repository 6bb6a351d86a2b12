#!/usr/bin/env bash
# Install and run from a wheel alone (CI's `make test-wheel`), with one CPU build that checks both
# the sdist and the wheel:
#   1. the sdist (`setup.py sdist`), unpacked into an empty folder;
#   2. a CPU wheel built from that folder (SSM_KERNELS_CUDA=0), so a file missing from the sdist
#      fails the build;
#   3. a fresh virtual environment that reaches the existing torch (and its dependencies, numpy
#      included) through a .pth file naming a folder of links to exactly those distributions, so
#      nothing else of the building environment is visible; the wheel is installed with --no-index
#      and its requirements (torch==X.Y.*, numpy) must be met by that torch;
#   4. from an empty folder outside the source tree: every op forward and backward against its
#      float64 reference and a faked torch version refused (tools/wheel_smoke.py), `ssm-kernels
#      info`, a one-op `ssm-kernels bench`;
#   5. `pip uninstall` leaves the environment exactly as before the install (file list compared).
#
# usage: [WHEEL=ssm_kernels-*.whl] tools/wheel_check.sh
#                                        (PYTHON: an interpreter with torch, setuptools, wheel,
#                                         ninja; default .venv/bin/python; WHEEL_CHECK_DIR: the
#                                         work folder, default build/wheel-check, emptied first)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
# The steps below change directory: a relative interpreter path (make passes .venv/bin/python) is
# made absolute here, from the caller's directory; a bare name stays a PATH lookup.
case $PY in /*) ;; */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac
WORK=${WHEEL_CHECK_DIR:-$ROOT/build/wheel-check}
export SSM_KERNELS_CUDA=0 PIP_NO_INDEX=1 PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
# WHEEL=path: check that wheel instead of building one (steps 3-5 only).
PREBUILT=${WHEEL:-}
[ -z "$PREBUILT" ] || PREBUILT=$(cd "$(dirname "$PREBUILT")" && pwd)/$(basename "$PREBUILT")
rm -rf "$WORK"
mkdir -p "$WORK"/sdist "$WORK"/src "$WORK"/dist "$WORK"/run
t_all=$(date +%s)
timed() {
  local label=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  echo "wheel-check: $label took $(( $(date +%s) - t0 )) s"
}

sdist() {
  (cd "$ROOT" && "$PY" setup.py -q egg_info --egg-base "$WORK" sdist --dist-dir "$WORK/sdist" > "$WORK/sdist.log" 2>&1) \
    || { tail -n 40 "$WORK/sdist.log"; return 1; }
  tar -xzf "$WORK"/sdist/*.tar.gz -C "$WORK/src"
  echo "wheel-check: sdist $(basename "$WORK"/sdist/*.tar.gz): $(tar -tzf "$WORK"/sdist/*.tar.gz | wc -l) entries"
  # The CPU build compiles no .cu/.cuh: every tracked build input must be there all the same.
  if git -C "$ROOT" rev-parse --git-dir > /dev/null 2>&1; then
    local missing
    missing=$(cd "$ROOT" && git ls-files csrc python build_config.json setup.py pyproject.toml CMakeLists.txt \
      | while read -r f; do [ -e "$(echo "$WORK"/src/*/)$f" ] || echo "$f"; done)
    if [ -n "$missing" ]; then echo "wheel-check: missing from the sdist: $missing"; return 1; fi
  fi
}
if [ -z "$PREBUILT" ]; then
timed "sdist" sdist
SRC=$(echo "$WORK"/src/*/)

build_wheel() {
  # The CPU seconds too: on a shared machine the wall time says little about the build itself.
  local cpu_time=()
  [ -x /usr/bin/time ] && cpu_time=(/usr/bin/time -f "wheel-check: build used %U s user + %S s system CPU" -o "$WORK/build-time.txt")
  (cd "$SRC" && "${cpu_time[@]}" "$PY" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" . \
    > "$WORK/wheel-build.log" 2>&1) || { tail -n 60 "$WORK/wheel-build.log"; return 1; }
  [ -f "$WORK/build-time.txt" ] && cat "$WORK/build-time.txt"
  if grep -E -- "-march=native|-mavx|-mfma|-msse4|-mtune=native" "$WORK/wheel-build.log"; then
    echo "wheel-check: the build used machine-specific flags (above)"; return 1
  fi
}
timed "CPU wheel build from the sdist (MAX_JOBS=${MAX_JOBS:-all cores})" build_wheel
WHEEL=$(echo "$WORK"/dist/ssm_kernels-*.whl)
else
  cp "$PREBUILT" "$WORK/dist/"
  WHEEL=$WORK/dist/$(basename "$PREBUILT")
fi
echo "wheel-check: built $(basename "$WHEEL")"

# Portable CPU code: every function with an AVX instruction (VEX/EVEX mnemonic, ymm/zmm register)
# must be an AVX2 copy of SSMK_CPU_MULTIVERSION (named *_avx2), reached only after the run-time check.
avx_outside_dispatch() {
  if ! command -v objdump > /dev/null; then echo "wheel-check: no objdump, AVX check skipped"; return 0; fi
  "$PY" -m zipfile -e "$WHEEL" "$WORK/wheel-contents"
  objdump -d --no-show-raw-insn -C "$WORK"/wheel-contents/ssm_kernels/_C*.so | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = $0; next }
    /^ +[0-9a-f]+:\t(v[a-z0-9]+|[a-z]+ .*%[yz]mm)/ { n[fn]++ }
    END { for (f in n) { total++; if (f !~ /_avx2/) { print "AVX outside the dispatch: " f; bad++ } }
          printf "wheel-check: %d functions use AVX, all AVX2 copies: %s\n", total, bad ? "no" : "yes"; exit bad > 0 }'
}
avx_outside_dispatch

make_venv() {
  "$PY" -m venv "$WORK/venv"
  local site
  site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PY" - "$WORK/torch-site" <<'EOF'
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution

# The folder of links: torch, numpy and what they require, each distribution's top-level entries.
shim = sys.argv[1]
os.makedirs(shim)
# A requirement of an extra (torch's cuda-toolkit[cudart,...]) counts when that extra was asked for.
extras, done = {}, {}
todo = ["torch", "numpy"]
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if done.get(name) == extras.get(name, set()):
        continue
    done[name] = set(extras.get(name, set()))
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        continue  # a requirement for another platform or Python
    for req in dist.requires or []:
        extra = re.search(r"extra == ['\"]([^'\"]+)['\"]", req)
        if extra and extra.group(1) not in done[name]:
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
        dep = re.sub(r"[-_.]+", "-", m.group(1)).lower()
        extras.setdefault(dep, set()).update(e.strip() for e in (m.group(2) or "").split(",") if e.strip())
        todo.append(dep)
    top = {str(f).split("/")[0] for f in dist.files or [] if not str(f).startswith("..")}
    for entry in top - {"__pycache__"}:
        src, dst = dist.locate_file(entry), os.path.join(shim, entry)
        if os.path.exists(src) and not entry.endswith(".pth") and not os.path.lexists(dst):
            os.symlink(src, dst)
print(f"wheel-check: torch reached through {len(os.listdir(shim))} links ({len(done)} distributions)")
EOF
  echo "$WORK/torch-site" > "$site/_torch_site.pth"
  # venv's own setuptools (Python < 3.12) would shadow the newer one torch requires.
  "$WORK/venv/bin/python" -m pip uninstall -q -y setuptools 2> /dev/null || true
  "$WORK/venv/bin/python" -m pip --version > /dev/null
}
timed "fresh venv" make_venv
VPY=$WORK/venv/bin/python
(cd "$WORK" && find venv | sort > files-before-install.txt)

timed "pip install --no-index" "$VPY" -m pip install --no-cache-dir "$WHEEL"
"$VPY" -m pip show ssm-kernels | grep -E "^(Name|Version|Requires):"

cp "$ROOT/tools/wheel_smoke.py" "$WORK/run/"
cd "$WORK/run"
timed "every op forward and backward (wheel_smoke.py)" "$VPY" wheel_smoke.py "$WORK/venv"
timed "ssm-kernels info" "$WORK/venv/bin/ssm-kernels" info
timed "ssm-kernels bench linear_scan" "$WORK/venv/bin/ssm-kernels" bench linear_scan --device cpu \
  --shape batch=2,dim=64,seqlen=256 --budget 0.05 --quiet

timed "pip uninstall" "$VPY" -m pip uninstall -y ssm-kernels
(cd "$WORK" && find venv | sort > files-after-uninstall.txt)
if ! diff "$WORK/files-before-install.txt" "$WORK/files-after-uninstall.txt"; then
  echo "wheel-check: pip uninstall left the files above behind (> lines)"
  exit 1
fi
echo "wheel-check: uninstall left nothing behind"
echo "wheel-check: all ok in $(( $(date +%s) - t_all )) s"
