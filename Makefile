# The two commands of the README, each doing its own set-up on a fresh machine:
#   make test    build (CPU kernels, and CUDA kernels when nvcc is found) and run the whole suite
#   make bench   build and run `ssm-kernels bench` on the default device (CUDA when present)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=
BENCH_ARGS ?=
export MAX_JOBS

.PHONY: all venv build test test-python test-cpp bench info cmake clean

all: test

$(VENV)/.deps-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel ninja
	$(PY) -m pip install "torch==$(TORCH_VERSION)" numpy pytest expecttest
	touch $@

venv: $(VENV)/.deps-stamp

# The compile lines (include paths elided) are echoed so a log shows what was built for which arch.
# pip builds an editable install from scratch each time, so the build is redone only when a source
# changed (`make clean` forces it, e.g. after changing SSM_KERNELS_CUDA or TORCH_CUDA_ARCH_LIST).
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
BUILD_STAMP := build/.build-stamp

$(BUILD_STAMP): $(SOURCES) setup.py pyproject.toml $(VENV)/.deps-stamp
	@mkdir -p build
	@echo "building ssm_kernels._C (log: build/pip-build.log)"
	@$(PY) -m pip install -v --no-build-isolation --no-deps -e . > build/pip-build.log 2>&1 || \
		(tail -n 60 build/pip-build.log; exit 1)
	@grep -E "^ *\[[0-9]+/[0-9]+\]" build/pip-build.log | sed -E 's/ -I[^ ]+//g; s/ -isystem [^ ]+//g' || true
	@grep -E "Successfully installed" build/pip-build.log
	@touch $@

build: venv $(BUILD_STAMP)

test: build test-cpp test-python

test-python: build
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

# C++ unit tests of the shared math headers (host side), through CMake/ctest.
test-cpp: venv
	cmake -S . -B build/cmake-tests -DSSMK_BUILD_LIBRARY=OFF -DSSMK_BUILD_TESTS=ON >/dev/null
	cmake --build build/cmake-tests -j $(MAX_JOBS)
	ctest --test-dir build/cmake-tests --output-on-failure

bench: build
	$(VENV)/bin/ssm-kernels bench $(BENCH_ARGS)

info: build
	$(VENV)/bin/ssm-kernels info

# The libtorch (C++) build of the same sources, for C++ consumers. A CUDA build of torch asks CMake
# for the CUDA toolkit (and nvrtc, which pip's torch keeps under nvidia/cu*/lib) even for a CPU
# library; the variables below point it there.
CMAKE_TORCH_ARGS = -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	-DCUDA_TOOLKIT_ROOT_DIR="$${CUDA_HOME:-/usr/local/cuda}" \
	-DCUDA_nvrtc_LIBRARY="$$($(PY) -c 'import glob, os, torch; g = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "lib", "libnvrtc.so*")); print(os.path.realpath(g[0]) if g else "")')"
cmake: venv
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-9.0a}" cmake -S . -B build/cmake $(CMAKE_TORCH_ARGS)
	cmake --build build/cmake -j $(MAX_JOBS)

clean:
	rm -rf build python/ssm_kernels/*.so
