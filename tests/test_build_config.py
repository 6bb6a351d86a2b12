"""The build's own description: the torch-version check before _C loads, build_info()'s format, and
that `ssm-kernels info` shows both torches."""
import subprocess
import sys
import textwrap

import pytest
import torch

import ssm_kernels
from ssm_kernels._build_check import check_torch_version, load_build_config, major_minor


def test_major_minor():
    assert major_minor("2.14.1+cu130") == (2, 14)
    assert major_minor("2.11.0") == (2, 11)
    assert major_minor("2.12.0a0+git1234abc") == (2, 12)
    assert major_minor("unknown") is None


@pytest.mark.parametrize("built,running", [("2.14.1+cu130", "2.14.1+cu130"), ("2.14.0", "2.14.1+cpu"),
                                           ("2.11.0+cu130", "2.11.1")])
def test_same_minor_passes(built, running):
    check_torch_version(built, running)


@pytest.mark.parametrize("built,running", [("2.11.0+cpu", "2.14.1+cu130"), ("2.14.1", "2.11.0"),
                                           ("3.0.0", "2.14.1")])
def test_other_minor_raises_import_error(built, running):
    with pytest.raises(ImportError) as err:
        check_torch_version(built, running)
    msg = str(err.value)
    b, r = major_minor(built), major_minor(running)
    assert f"built against torch {b[0]}.{b[1]}" in msg and f"running torch {r[0]}.{r[1]}" in msg
    assert "pip install --no-build-isolation -e ." in msg and "make build" in msg
    assert f"install the torch it was built against (torch=={b[0]}.{b[1]}.*)" in msg
    assert f"wheel built for torch {r[0]}.{r[1]}" in msg and f"+torch{r[0]}.{r[1]}cpu" in msg


def _import_with_config(config_source):
    """`import ssm_kernels` in a fresh interpreter whose ssm_kernels._build_config is `config_source`
    (None: no config module, as a CMake build of the library has none)."""
    if config_source is None:
        setup = "sys.modules['ssm_kernels._build_config'] = None  # import of it fails"
    else:
        setup = ("cfg = types.ModuleType('ssm_kernels._build_config'); "
                 f"exec({config_source!r}, cfg.__dict__); sys.modules['ssm_kernels._build_config'] = cfg")
    code = textwrap.dedent(f"""
        import sys, types
        {setup}
        try:
            import ssm_kernels
        except ImportError as exc:
            print("ImportError:", exc)
            sys.exit(3)
        print("loaded", ssm_kernels.build_info()["torch_built"])
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_refuses_a_build_for_another_torch():
    out = _import_with_config("TORCH_VERSION = '1.13.1'\nCUDA = False\nCUDA_ARCHS = []\nCUDA_VERSION = None\n")
    assert out.returncode == 3, out.stdout + out.stderr
    r = major_minor(torch.__version__)
    assert "built against torch 1.13 (1.13.1)" in out.stdout
    assert f"running torch {r[0]}.{r[1]} ({torch.__version__})" in out.stdout
    assert "undefined symbol" not in out.stdout + out.stderr


def test_import_accepts_a_build_for_this_torch():
    out = _import_with_config(f"TORCH_VERSION = {torch.__version__!r}\nCUDA = False\nCUDA_ARCHS = []\n"
                              "CUDA_VERSION = None\n")
    assert out.returncode == 0 and f"loaded {torch.__version__}" in out.stdout, out.stdout + out.stderr


def test_import_without_a_config_skips_the_check():
    out = _import_with_config(None)
    assert out.returncode == 0 and "loaded None" in out.stdout, out.stdout + out.stderr


def test_this_build_was_made_for_this_torch():
    cfg = load_build_config()
    if cfg is None:
        pytest.skip("no _build_config.py (not built by setup.py)")
    assert major_minor(cfg.TORCH_VERSION) == major_minor(torch.__version__)
    info = ssm_kernels.build_info()
    assert info["torch_built"] == cfg.TORCH_VERSION
    assert info["cuda"] == cfg.CUDA
    if cfg.CUDA:
        assert info["cuda_archs"] == cfg.CUDA_ARCHS


def test_build_info_items_are_unambiguous():
    raw = torch.ops.ssm_kernels.build_info()
    items = raw.split(";")
    assert all("=" in item for item in items), raw
    keys = [item.partition("=")[0] for item in items]
    assert keys == ["cuda", "cuda_archs", "cpu_isa", "cpu_isa_build", "openmp"], raw
    info = ssm_kernels.build_info()
    assert set(keys) <= set(info) and "" not in info
    assert isinstance(info["cuda_archs"], list) and all(";" not in a and a for a in info["cuda_archs"])
    assert info["cuda"] == bool(info["cuda_archs"])


@pytest.mark.parametrize("raw,archs", [
    ("cuda=1;cuda_archs=8.0 9.0a;cpu_isa=avx2;cpu_isa_build=sse2;openmp=1", "8.0 9.0a"),
    ("cuda=1;cuda_archs=8.0;9.0a;cpu_isa=avx2;cpu_isa_build=sse2;openmp=1", "8.0 9.0a"),  # an older build's
    ("cuda=0;cuda_archs=;cpu_isa=sse2;cpu_isa_build=sse2;openmp=0", ""),
])
def test_parse_build_info(raw, archs):
    info = ssm_kernels.parse_build_info(raw)
    assert set(info) == {"cuda", "cuda_archs", "cpu_isa", "cpu_isa_build", "openmp"}
    assert info["cuda_archs"] == archs


def test_info_shows_the_build_and_running_torch():
    out = subprocess.run([sys.executable, "-m", "ssm_kernels", "info"], capture_output=True, text=True, check=True)
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("torch "))
    assert line.startswith(f"torch {torch.__version__} (built against torch "), line
    cfg = load_build_config()
    if cfg is not None:
        assert f"built against torch {cfg.TORCH_VERSION};" in line


def test_cpu_isa_is_picked_at_run_time_on_a_portable_build():
    """The CPU kernels' path follows the running CPU (AVX2+FMA when it has both); the compiler was
    allowed only the baseline ISA, so the library loads on any x86-64 (or aarch64)."""
    info = ssm_kernels.build_info()
    assert info["cpu_isa_build"] in ("sse2", "neon"), info
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    if info["cpu_isa_build"] == "sse2":
        expected = "avx2" if {"avx2", "fma"} <= set(flags) else "sse2"
        assert info["cpu_isa"] == expected, (info, expected)
    out = subprocess.run([sys.executable, "-m", "ssm_kernels", "info"], capture_output=True, text=True, check=True)
    assert f"CPU kernels: {info['cpu_isa']} path" in out.stdout, out.stdout
