#!/usr/bin/env bash
# Prepares .peers/ (git-ignored) for a GPU machine that cannot download anything (a few MB):
#   .peers/src/mamba          state-spaces/mamba, pruned to csrc/selective_scan (built there into
#                             selective_scan_cuda by bench/build_peers.py) and the Python needed
#                             by its interface and its Triton kernels (mamba_chunk_scan_combined,
#                             selective_state_update, mamba3_siso_combined), with a minimal
#                             mamba_ssm/__init__.py
#   .peers/src/causal-conv1d  Dao-AILab/causal-conv1d, pruned to csrc/ and the causal_conv1d
#                             package (its extension causal_conv1d_cuda is built there too)
#   .peers/site               pure-Python wheels a GPU image may lack: einops (mamba_ssm), and
#                             expecttest (opcheck)
# Run it where git (or pip) reaches the network; carry .peers to the GPU machine;
# bench/gpu_check.sh builds the extensions and puts everything on PYTHONPATH.
#
#   bash bench/fetch_peers.sh        # MAMBA_REF=v2.3.2.post1 CAUSAL_CONV1D_REF=v1.6.1.post4
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
MAMBA_REF="${MAMBA_REF:-v2.3.2.post1}"
CAUSAL_CONV1D_REF="${CAUSAL_CONV1D_REF:-v1.6.1.post4}"
rm -rf .peers
mkdir -p .peers/src .peers/site .peers/dl

# fetch <url> <ref> <dest> <sdist name==version>: a shallow git clone of the tag; if git cannot
# reach GitHub, the sdist from the package registry (same files). A tag's .postN releases only
# rebuilt wheels where the registry lacks their sdist (causal-conv1d 1.6.1.post4: csrc/ and the
# package equal 1.6.1's), so the sdist without the .postN suffix is the second choice.
fetch() {
  local url="$1" ref="$2" dest="$3" sdist="$4"
  if git clone -q --depth 1 --branch "$ref" "$url" "$dest" 2>/dev/null; then
    rm -rf "$dest/.git"
  else
    echo "git clone $url@$ref failed; trying the sdist $sdist" >&2
    # The sdists' metadata step imports torch, so no build isolation.
    "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d .peers/dl "$sdist" ||
      "$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d .peers/dl "${sdist%.post*}"
    local tarball
    tarball=$(ls .peers/dl/*.tar.gz | head -n 1)
    mkdir -p "$dest"
    tar xzf "$tarball" -C "$dest" --strip-components=1
    rm -f "$tarball"
  fi
}

# keep <dir> <paths...>: delete everything in dir except the given relative paths.
keep() {
  local dir="$1"; shift
  local tmp="$dir.keep"
  mkdir -p "$tmp"
  for p in "$@"; do
    if [ -e "$dir/$p" ]; then
      mkdir -p "$tmp/$(dirname "$p")"
      cp -r "$dir/$p" "$tmp/$p"
    else
      echo "warning: $dir/$p not found" >&2
    fi
  done
  rm -rf "$dir"
  mv "$tmp" "$dir"
}

# mamba: the version from a tag name like v2.3.2.post1
fetch https://github.com/state-spaces/mamba.git "$MAMBA_REF" .peers/src/mamba "mamba-ssm==${MAMBA_REF#v}"
keep .peers/src/mamba LICENSE csrc/selective_scan \
  mamba_ssm/ops/__init__.py mamba_ssm/ops/selective_scan_interface.py \
  mamba_ssm/utils/__init__.py mamba_ssm/utils/torch.py mamba_ssm/utils/determinism.py \
  mamba_ssm/ops/triton
# The real __init__ imports the modules and models (pruned here); the ops import by full name.
echo "__version__ = \"${MAMBA_REF#v}\"  # pruned by bench/fetch_peers.sh: ops only" > .peers/src/mamba/mamba_ssm/__init__.py

fetch https://github.com/Dao-AILab/causal-conv1d.git "$CAUSAL_CONV1D_REF" .peers/src/causal-conv1d \
  "causal-conv1d==${CAUSAL_CONV1D_REF#v}"
keep .peers/src/causal-conv1d LICENSE csrc causal_conv1d

"$PY" -m pip download -q --no-deps --only-binary=:all: -d .peers/dl einops expecttest
for wheel in .peers/dl/*.whl; do
  "$PY" -m zipfile -e "$wheel" .peers/site
done
rm -rf .peers/dl
find .peers -name "__pycache__" -prune -exec rm -rf {} +
# what was kept
find .peers/src -maxdepth 3 | sort
du -sh .peers/src/* .peers/site; du -sh .peers
