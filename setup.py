"""Build of ssm_kernels._C: CPU kernels always, CUDA kernels when nvcc is found.

Environment:
  SSM_KERNELS_CUDA=0/1   force the CUDA kernels off/on (default: on when nvcc is found)
  TORCH_CUDA_ARCH_LIST   archs to build; default: the visible GPU's, else build_config.json's
                         default_cuda_archs; a wheel (bdist_wheel) builds build_config.json's
                         wheel_cuda_archs that the installed nvcc supports instead
  SSM_KERNELS_PTXAS_VERBOSE=1  pass -Xptxas -v (register and spill report per kernel)
  SSM_KERNELS_BUILD_BASE setuptools' build folder (default: build); a second build against another
                         torch uses its own so the two never share object files
  MAX_JOBS               parallel compile jobs (ninja)

Sources, flags and default archs come from build_config.json, which CMakeLists.txt reads too.
The build writes ssm_kernels/_build_config.py next to the extension (torch version, CUDA on/off,
archs, CUDA version); `import ssm_kernels` checks it against the running torch before loading _C.

A build says what it was built for in its version and requirements: 0.1.0+torch2.14cpu or
0.1.0+torch2.14cu130 (torch's CUDA release, whose runtime _C uses), requiring torch==2.14.*. An
sdist keeps the plain version and torch>=2.11, since the torch is chosen where it is built.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "build_config.json")) as f:
    CONFIG = json.load(f)
# The one version string is ssm_kernels.__version__ (read here without importing the package).
with open(os.path.join(ROOT, "python", "ssm_kernels", "__init__.py")) as f:
    BASE_VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
# The oldest torch the sources build against (CI builds and tests it); a built wheel pins its own.
TORCH_MIN = "2.11"


def _find_cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        cand = os.path.dirname(os.path.dirname(real))
        if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
            return cand
    return None


def _want_cuda(cuda_home):
    flag = os.environ.get("SSM_KERNELS_CUDA")
    if flag is not None and flag.strip() != "":
        want = flag.strip() not in ("0", "false", "False", "no", "off")
        if want and cuda_home is None:
            sys.exit("SSM_KERNELS_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        return want
    return cuda_home is not None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so settle it first.
CUDA_HOME = _find_cuda_home()
WITH_CUDA = _want_cuda(CUDA_HOME)
if WITH_CUDA:
    os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extra_cuda_includes():
    """Headers that ATen's CUDA headers need but a bare CUDA toolkit may lack.

    torch's CUDA wheels ship cuBLAS/cuSPARSE/cuFFT headers under site-packages/nvidia/*/include;
    CUTLASS/CuTe come from the nvidia-cutlass package when installed.
    """
    dirs = []
    try:
        import nvidia  # namespace package installed with CUDA builds of torch

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    except ImportError:
        pass
    try:
        import cutlass_library

        inc = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
        if os.path.isdir(inc):
            dirs.append(inc)
    except ImportError:
        pass
    return [d for d in dirs if os.path.isdir(d)]


def _nvcc_supported_archs():
    """The real archs the installed nvcc can compile for, as "9.0"-style names (nvcc lists the plain
    archs only; their arch-specific "a" variants go with them)."""
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--list-gpu-code"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return set()
    archs = set()
    for m in re.finditer(r"sm_(\d+)(\d)([a-z]?)\b", out):
        archs.add(f"{m.group(1)}.{m.group(2)}{m.group(3)}")
    return archs


def _wheel_arch_list():
    """build_config.json's wheel_cuda_archs that the installed nvcc supports (a "+PTX" suffix is
    kept when the arch itself is supported)."""
    supported = _nvcc_supported_archs()
    archs = [a for a in CONFIG["wheel_cuda_archs"] if a.removesuffix("+PTX").rstrip("af") in supported]
    if not archs:
        sys.exit(f"nvcc at {CUDA_HOME} supports none of the wheel archs {CONFIG['wheel_cuda_archs']}")
    return ";".join(archs)


def _default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if BUILDING_WHEEL:
        return _wheel_arch_list()
    if torch.cuda.is_available():
        archs = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" + ("a" if a == 9 else "") for a, b in archs)
    return ";".join(CONFIG["default_cuda_archs"])


def sources(key):
    """The files matching build_config.json's globs under `key`, minus its exclude_dirs."""
    found = set()
    for pattern in CONFIG[key]:
        found.update(glob.glob(pattern, root_dir=ROOT, recursive=True))
    excluded = tuple(d.rstrip("/") + "/" for d in CONFIG["exclude_dirs"])
    return sorted(f for f in found if not f.replace(os.sep, "/").startswith(excluded))


def _cuda_version():
    """The release of the nvcc that compiles the kernels (e.g. "13.0"), or None."""
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def build_config_text(arch_list):
    """ssm_kernels/_build_config.py: what this extension was built against (read before loading _C)."""
    values = {
        "TORCH_VERSION": torch.__version__,
        "CUDA": WITH_CUDA,
        "CUDA_ARCHS": arch_list.replace(";", " ").split() if WITH_CUDA else [],
        "CUDA_VERSION": _cuda_version() if WITH_CUDA else None,
    }
    lines = ["# Written by setup.py when ssm_kernels._C is built; not tracked by git.\n"]
    lines += [f"{key} = {value!r}\n" for key, value in values.items()]
    return "".join(lines)


class BuildExt(BuildExtension):
    """torch's build_ext, plus _build_config.py written next to the built _C (in place for an
    editable install, into the wheel's tree otherwise)."""

    def run(self):
        super().run()
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("ssm_kernels._C")), "_build_config.py")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "w") as f:
            f.write(build_config_text(ARCH_LIST))


ARCH_LIST = ""
# A wheel is built for other machines: its archs never come from the GPU of the building machine.
BUILDING_WHEEL = "bdist_wheel" in sys.argv[1:]
BUILDING_SDIST = "sdist" in sys.argv[1:]


def torch_major_minor():
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def local_version_tag():
    """"torch2.14cpu" or "torch2.14cu130": the torch major.minor and, with CUDA kernels, the CUDA
    release of that torch (the runtime _C links against, none of it shipped with the wheel)."""
    if not WITH_CUDA:
        return f"torch{torch_major_minor()}cpu"
    cuda = torch.version.cuda or _cuda_version()
    return f"torch{torch_major_minor()}cu{cuda.replace('.', '')}"


def package_version():
    return BASE_VERSION if BUILDING_SDIST else f"{BASE_VERSION}+{local_version_tag()}"


def install_requires():
    torch_req = f"torch>={TORCH_MIN}" if BUILDING_SDIST else f"torch=={torch_major_minor()}.*"
    return [torch_req, "numpy"]


def make_extension():
    global ARCH_LIST
    # The standard is set explicitly: older torch's cpp_extension defaults to C++17 (the later flag wins).
    std = f"-std=c++{CONFIG['cxx_std']}"
    cxx_flags = [std] + list(CONFIG["cxx_flags"]) + (["-fopenmp"] if CONFIG["openmp"] else [])
    link_flags = ["-fopenmp"] if CONFIG["openmp"] else []
    define_macros = [tuple(d.split("=", 1)) for d in CONFIG["python_module_defines"]]
    include_dirs = [os.path.join(ROOT, d) for d in CONFIG["include_dirs"]]
    srcs = sources("cxx_sources")
    if not WITH_CUDA:
        return CppExtension(
            "ssm_kernels._C",
            srcs,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
            py_limited_api=True,
        )
    arch_list = ARCH_LIST = _default_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    # Spaces, not ';', inside the value: build_info() is a ';'-separated list of key=value items.
    archs_value = " ".join(arch_list.replace(";", " ").split())
    define_macros += [("SSMK_WITH_CUDA", "1"), ("SSMK_CUDA_ARCHS", f'"{archs_value}"')]
    nvcc_flags = [std] + list(CONFIG["nvcc_flags"])
    if os.environ.get("SSM_KERNELS_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    include_dirs += _extra_cuda_includes()
    return CUDAExtension(
        "ssm_kernels._C",
        srcs + sources("cuda_sources"),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
        py_limited_api=True,
    )


setup(
    version=package_version(),
    install_requires=install_requires(),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"},
             "build": {"build_base": os.environ.get("SSM_KERNELS_BUILD_BASE") or "build"}},
)
