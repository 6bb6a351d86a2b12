# The two commands of the README, each doing its own set-up on a fresh machine:
#   make test    build (CPU kernels, and CUDA kernels when nvcc is found) and run the whole suite
#   make bench   build and run `ssm-kernels bench` on the default device (CUDA when present)
# and, in CI after `make test`:
#   make test-torch-min   CPU-only build and CPU tests against the oldest torch claimed (pyproject)
#   make cmake            the libtorch (CMake) build of the library from the same build_config.json
#   make test-wheel       sdist -> CPU wheel -> fresh venv: every op, info, bench, clean uninstall
# Packaging (docs/build.md): `make wheel` (dist/, CPU or CUDA as for `make build`), `make sdist`,
# `make release` (the wheel matrix; needs network).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
MAX_JOBS ?= $(shell nproc 2>/dev/null || echo 2)
PYTEST_ARGS ?=
# The oldest torch pyproject.toml claims (torch>=2.11, the GPU machines' torch): a second venv, a
# CPU-only build installed into it (not in place, its own build folder), the CPU tests.
TORCH_MIN_VERSION ?= 2.11
VENV_MIN ?= .venv-torch$(TORCH_MIN_VERSION)
PY_MIN := $(VENV_MIN)/bin/python
# torch comes from the package registry (its default Linux wheel, with the CUDA libraries: the build
# is CPU-only all the same); TORCH_MIN_PIP_ARGS can point pip at a CPU-only wheel index instead.
TORCH_MIN_PIP_ARGS ?=
# The whole CPU suite: it takes about a minute on 2 cores (the build about 4), well within CI's budget.
TORCH_MIN_PYTEST_ARGS ?=
BENCH_ARGS ?=
export MAX_JOBS

.PHONY: all venv build test test-python test-cpp bench info cmake venv-torch-min build-torch-min test-torch-min clean \
	wheel sdist test-wheel release

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

$(BUILD_STAMP): $(SOURCES) setup.py build_config.json pyproject.toml $(VENV)/.deps-stamp
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

$(VENV_MIN)/.deps-stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV_MIN)
	$(PY_MIN) -m pip install --upgrade pip setuptools wheel ninja
	$(PY_MIN) -m pip install $(TORCH_MIN_PIP_ARGS) "torch==$(TORCH_MIN_VERSION).*" numpy pytest expecttest
	touch $@

venv-torch-min: $(VENV_MIN)/.deps-stamp

MIN_BUILD_STAMP := build/torch$(TORCH_MIN_VERSION)/.build-stamp
PY_SOURCES := $(shell find python -name '*.py' ! -name '_build_config.py' 2>/dev/null)

# A regular (not editable) install, so the in-place _C and _build_config.py of `make build` stay
# those of the pinned torch; SSM_KERNELS_BUILD_BASE keeps its objects apart.
$(MIN_BUILD_STAMP): $(SOURCES) $(PY_SOURCES) setup.py build_config.json pyproject.toml $(VENV_MIN)/.deps-stamp
	@mkdir -p $(dir $@)
	@echo "building ssm_kernels._C against torch $(TORCH_MIN_VERSION), CPU only (log: $(dir $@)pip-build.log)"
	@SSM_KERNELS_CUDA=0 SSM_KERNELS_BUILD_BASE=$(dir $@) $(PY_MIN) -m pip install -v --no-build-isolation \
		--no-deps . > $(dir $@)pip-build.log 2>&1 || (tail -n 60 $(dir $@)pip-build.log; exit 1)
	@grep -E "Successfully installed" $(dir $@)pip-build.log
	@touch $@

build-torch-min: venv-torch-min $(MIN_BUILD_STAMP)

# Run from the repository root, whose python/ is not on sys.path: the tests import the installed copy.
test-torch-min: build-torch-min
	$(PY_MIN) -c "import torch, ssm_kernels as s; print('torch', torch.__version__, 'build', s.build_info())"
	$(PY_MIN) -m pytest -q $(TORCH_MIN_PYTEST_ARGS) tests

bench: build
	$(VENV)/bin/ssm-kernels bench $(BENCH_ARGS)

info: build
	$(VENV)/bin/ssm-kernels info

# The libtorch (C++) build of the same sources, flags and default archs (build_config.json), for C++
# consumers; CPU only unless SSMK_CMAKE_CUDA=ON. A CUDA build of torch asks CMake for the CUDA
# toolkit (and nvrtc, which pip's torch keeps under nvidia/cu*/lib) even for a CPU library; the
# variables below point it there, and at the cuBLAS/cuSPARSE headers pip's torch ships.
SSMK_CMAKE_CUDA ?= OFF
CMAKE_TORCH_ARGS = -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
	-DCUDA_TOOLKIT_ROOT_DIR="$${CUDA_HOME:-/usr/local/cuda}" \
	-DCUDA_nvrtc_LIBRARY="$$($(PY) -c 'import glob, os, torch; g = glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "lib", "libnvrtc.so*")); print(os.path.realpath(g[0]) if g else "")')" \
	-DSSMK_EXTRA_CUDA_INCLUDE_DIRS="$$($(PY) -c 'import glob, os, torch; print(";".join(sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "*", "include")))))')"
cmake: venv
	cmake -S . -B build/cmake -DSSMK_WITH_CUDA=$(SSMK_CMAKE_CUDA) $(CMAKE_TORCH_ARGS)
	cmake --build build/cmake -j $(MAX_JOBS)

# A binary wheel of this tree into dist/: CUDA kernels when nvcc is found (SSM_KERNELS_CUDA=0: CPU
# only), for build_config.json's wheel_cuda_archs that nvcc supports unless TORCH_CUDA_ARCH_LIST is set.
wheel: venv
	SSM_KERNELS_BUILD_BASE=build/wheel $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .
	@ls -l dist/*.whl

sdist: venv
	$(PY) setup.py -q egg_info --egg-base build sdist --dist-dir dist
	@ls -l dist/*.tar.gz

test-wheel: venv
	PYTHON=$(PY) tools/wheel_check.sh

release:
	tools/release.sh

clean:
	rm -rf build python/ssm_kernels/*.so python/ssm_kernels/_build_config.py
