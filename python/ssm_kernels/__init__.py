"""ssm-kernels: fast CPU and CUDA kernels for state-space sequence models.

The ops are registered with torch.library under ``torch.ops.ssm_kernels`` and re-exported here
as plain functions (see API.md for the contract).
"""
import torch

try:
    from . import _C  # noqa: F401  (loads the library; registers the op schemas and kernels)
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "ssm_kernels._C is missing: build the package first (`pip install --no-build-isolation -e .` "
        "or `make build`)"
    ) from exc

from . import reference  # noqa: E402
from .ops import *  # noqa: E402,F401,F403
from .ops import __all__ as _ops_all  # noqa: E402

__version__ = "0.1.0"
__all__ = list(_ops_all) + ["reference", "build_info"]


def build_info() -> dict:
    """What this build contains: CUDA kernels and archs, CPU ISA, OpenMP, torch version."""
    info = {}
    for item in torch.ops.ssm_kernels.build_info().split(";"):
        key, _, value = item.partition("=")
        info[key] = value
    info["cuda"] = info.get("cuda") == "1"
    info["torch"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
