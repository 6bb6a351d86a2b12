#!/usr/bin/env bash
# Prepares .peers/ (git-ignored) for a GPU machine that cannot download anything: the mamba-ssm
# source (its Triton kernels are the peers of ssd_scan and selective_state_update; its CUDA part
# is not built, see `peer()` in python/ssm_kernels/bench/registry.py) and the pure-Python test
# dependencies a GPU image may lack (expecttest for opcheck, einops for mamba-ssm). Run it where
# pip works; bench/gpu_check.sh puts .peers/site on PYTHONPATH when the folder is there.
#
#   bash bench/fetch_peers.sh            # then carry .peers to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY="${PYTHON:-.venv/bin/python}"; else PY="${PYTHON:-python3}"; fi
MAMBA_SSM_VERSION="${MAMBA_SSM_VERSION:-2.3.2.post1}"
rm -rf .peers
mkdir -p .peers/site .peers/dl
# The sdist's metadata step imports torch, so no build isolation.
"$PY" -m pip download -q --no-deps --no-build-isolation --no-binary :all: -d .peers/dl "mamba-ssm==$MAMBA_SSM_VERSION"
tar xzf .peers/dl/mamba_ssm-*.tar.gz -C .peers/dl
mv .peers/dl/mamba_ssm-*/mamba_ssm .peers/site/
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .peers/dl expecttest einops
for wheel in .peers/dl/*.whl; do
  "$PY" -m zipfile -e "$wheel" .peers/site
done
rm -rf .peers/dl
du -sh .peers
