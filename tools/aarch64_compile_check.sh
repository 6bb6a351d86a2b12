#!/usr/bin/env bash
# Compiles every C++ source of the CPU build for aarch64 with a cross compiler (objects only:
# linking and running need an aarch64 torch and machine). Checks that nothing x86-specific
# (AVX2 paths, intrinsics, flags) leaks outside its guards. Usage:
#   tools/aarch64_compile_check.sh [python]   (python: the interpreter whose torch headers to use)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CXX=${AARCH64_CXX:-$(command -v aarch64-linux-gnu-g++ || command -v aarch64-linux-gnu-g++-12 || true)}
if [[ -z "$CXX" ]]; then
  echo "no aarch64 cross compiler (aarch64-linux-gnu-g++) found" >&2
  exit 2
fi
read -r TI PYINC < <("$PY" -c "import sysconfig, torch.utils.cpp_extension as c; print(c.include_paths()[0], sysconfig.get_paths()['include'])")
FLAGS=$("$PY" -c "import json; print(' '.join(json.load(open('build_config.json'))['cxx_flags']))")
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
fail=0
for src in $("$PY" -c "
import glob, json
c = json.load(open('build_config.json'))
files = sorted({f for g in c['cxx_sources'] for f in glob.glob(g, recursive=True)})
print(' '.join(f for f in files if not any(f.startswith(d + '/') for d in c['exclude_dirs'])))"); do
  if "$CXX" -std=c++20 $FLAGS -fopenmp -fPIC -Icsrc -I"$TI" -I"$TI/torch/csrc/api/include" -I"$PYINC" \
      -DSSMK_PYTHON_MODULE=1 -DPy_LIMITED_API=0x030A0000 -c "$src" -o "$OUT/$(basename "$src").o" 2> "$OUT/err"; then
    echo "OK   $src"
  else
    echo "FAIL $src"; head -20 "$OUT/err"; fail=1
  fi
done
exit $fail
