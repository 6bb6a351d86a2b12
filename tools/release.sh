#!/usr/bin/env bash
# The release wheel matrix (`make release`), for a maintainer's Linux x86-64 machine with network
# access (pip installs torch from download.pytorch.org into each venv) and, for each CUDA variant,
# the matching CUDA toolkit. See docs/build.md.
#
#   1. one sdist, which every wheel is built from;
#   2. per torch release and variant (cpu, cuXYZ): a build venv with Python $BUILD_PYTHON and that
#      torch, and one wheel built from the sdist. _C uses the stable Python ABI (cp310-abi3), so
#      one wheel serves every Python >= 3.10; the torch major.minor and CUDA release are in its
#      version (+torch2.14cpu, +torch2.14cu130);
#   3. per wheel and Python in $PYTHONS: a fresh venv with that Python and torch, the wheel
#      installed, and tools/wheel_smoke.py run from an empty folder (every op forward and backward
#      on CPU, a faked torch version refused). The CUDA kernels are only compiled here; run
#      bench/gpu_check.sh on a GPU machine with the CUDA wheel installed before publishing.
#
# Settings (environment):
#   TORCH_VERSIONS  torch major.minor releases    default "2.11 2.12 2.13 2.14"
#   VARIANTS        cpu and/or cuXYZ              default "cpu cu130"
#   PYTHONS         interpreters to test with     default "3.10 3.11 3.12 3.13" (pythonX.Y on PATH)
#   BUILD_PYTHON    interpreter that builds       default the first of PYTHONS
#   CUDA_HOME_cuXYZ the toolkit of variant cuXYZ  default /usr/local/cuda-X.Y
#   TORCH_CUDA_ARCH_LIST  archs of the CUDA wheels default build_config.json's wheel_cuda_archs
#   TORCH_INDEX     torch's wheel index root      default https://download.pytorch.org/whl
#   RELEASE_DIR     output folder                 default dist/release (wheels, sdist, logs)
#   MAX_JOBS        parallel compile jobs         default all cores
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TORCH_VERSIONS=${TORCH_VERSIONS:-2.11 2.12 2.13 2.14}
VARIANTS=${VARIANTS:-cpu cu130}
PYTHONS=${PYTHONS:-3.10 3.11 3.12 3.13}
BUILD_PYTHON=${BUILD_PYTHON:-${PYTHONS%% *}}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl}
OUT=$(mkdir -p "${RELEASE_DIR:-$ROOT/dist/release}" && cd "${RELEASE_DIR:-$ROOT/dist/release}" && pwd)
WORK=$OUT/work
rm -rf "$WORK"
mkdir -p "$WORK"
log() { echo "release: $*" | tee -a "$OUT/release.log"; }

for py in $PYTHONS $BUILD_PYTHON; do
  command -v "python$py" > /dev/null || { echo "release: python$py not found on PATH"; exit 1; }
done

# venv DIR PYTHON TORCH VARIANT [PACKAGES...]: a fresh venv with torch TORCH.* of VARIANT.
venv() {
  local dir=$1 py=$2 torch=$3 variant=$4
  shift 4
  "python$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q --index-url "$TORCH_INDEX/$variant" --extra-index-url https://pypi.org/simple \
    "torch==$torch.*" numpy "$@"
}

t0=$(date +%s)
venv "$WORK/venv-sdist" "$BUILD_PYTHON" "${TORCH_VERSIONS%% *}" cpu setuptools wheel ninja
(cd "$ROOT" && SSM_KERNELS_CUDA=0 "$WORK/venv-sdist/bin/python" setup.py -q egg_info --egg-base "$WORK" \
  sdist --dist-dir "$OUT") > "$WORK/sdist.log" 2>&1
SDIST=$(ls -t "$OUT"/ssm_kernels-*.tar.gz | head -n 1)
log "sdist $(basename "$SDIST")"

built=()
failed=()
for torch in $TORCH_VERSIONS; do
  for variant in $VARIANTS; do
    name=torch$torch$variant
    src=$WORK/src-$name
    mkdir -p "$src"
    tar -xzf "$SDIST" -C "$src" --strip-components=1
    if [ "$variant" = cpu ]; then
      cuda_env=(SSM_KERNELS_CUDA=0)
    else
      digits=${variant#cu}
      home_var=CUDA_HOME_$variant
      cuda_home=${!home_var:-/usr/local/cuda-${digits:0:-1}.${digits: -1}}
      [ -x "$cuda_home/bin/nvcc" ] || { log "$name: no nvcc at $cuda_home (set $home_var); skipped"; failed+=("$name"); continue; }
      cuda_env=(SSM_KERNELS_CUDA=1 CUDA_HOME="$cuda_home" PATH="$cuda_home/bin:$PATH")
    fi
    tb=$(date +%s)
    if ! venv "$WORK/build-$name" "$BUILD_PYTHON" "$torch" "$variant" setuptools wheel ninja > "$WORK/build-$name.log" 2>&1 ||
       ! (cd "$src" && env "${cuda_env[@]}" "$WORK/build-$name/bin/python" -m pip wheel -v --no-build-isolation \
            --no-deps -w "$OUT" .) >> "$WORK/build-$name.log" 2>&1; then
      log "$name: build FAILED (log: $WORK/build-$name.log)"
      failed+=("$name")
      continue
    fi
    wheel=$(ls "$OUT"/ssm_kernels-*+"$name"-*.whl)
    log "$name: built $(basename "$wheel") in $(( $(date +%s) - tb )) s"
    built+=("$wheel")
    for py in $PYTHONS; do
      test_dir=$WORK/test-py$py-$name
      mkdir -p "$test_dir/run"
      cp "$ROOT/tools/wheel_smoke.py" "$test_dir/run/"
      if venv "$test_dir/venv" "$py" "$torch" "$variant" > "$test_dir/log" 2>&1 &&
         "$test_dir/venv/bin/python" -m pip install --no-index "$wheel" >> "$test_dir/log" 2>&1 &&
         (cd "$test_dir/run" && "$test_dir/venv/bin/python" wheel_smoke.py "$test_dir/venv") >> "$test_dir/log" 2>&1; then
        log "$name: Python $py ok"
      else
        log "$name: Python $py FAILED (log: $test_dir/log)"
        failed+=("$name-py$py")
      fi
    done
  done
done

log "done in $(( $(date +%s) - t0 )) s: ${#built[@]} wheels in $OUT"
for w in "${built[@]}"; do log "  $(basename "$w")"; done
if [ ${#failed[@]} -gt 0 ]; then
  log "failed: ${failed[*]}"
  exit 1
fi
