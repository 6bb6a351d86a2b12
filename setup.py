"""Build of ssm_kernels._C: CPU kernels always, CUDA kernels when nvcc is found.

Environment:
  SSM_KERNELS_CUDA=0/1   force the CUDA kernels off/on (default: on when nvcc is found)
  TORCH_CUDA_ARCH_LIST   archs to build; default: the visible GPU's, else "8.0;9.0a"
  SSM_KERNELS_PTXAS_VERBOSE=1  pass -Xptxas -v (register and spill report per kernel)
  MAX_JOBS               parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


def _default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        archs = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" + ("a" if a == 9 else "") for a, b in archs)
    return "8.0;9.0a"


def sources(pattern):
    # One source list for setup.py and CMakeLists.txt: every file under csrc/ except the C++ unit tests.
    found = glob.glob(os.path.join("csrc", "**", pattern), recursive=True)
    return sorted(f for f in found if not f.startswith(os.path.join("csrc", "tests")))


def make_extension():
    cxx_flags = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x030A0000", "-fno-math-errno", "-fno-trapping-math"]
    define_macros = [("SSMK_PYTHON_MODULE", "1")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    srcs = sources("*.cpp")
    if not WITH_CUDA:
        return CppExtension(
            "ssm_kernels._C",
            srcs,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    arch_list = _default_arch_list()
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    define_macros += [("SSMK_WITH_CUDA", "1"), ("SSMK_CUDA_ARCHS", f'"{arch_list}"')]
    nvcc_flags = [
        "-O3",
        "--expt-relaxed-constexpr",
        "--expt-extended-lambda",
        "-lineinfo",
        "-DPy_LIMITED_API=0x030A0000",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ]
    if os.environ.get("SSM_KERNELS_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")
    include_dirs += _extra_cuda_includes()
    return CUDAExtension(
        "ssm_kernels._C",
        srcs + sources("*.cu"),
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
