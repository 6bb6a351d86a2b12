"""ssm-kernels: fast CPU and CUDA kernels for state-space sequence models.

The ops are registered with torch.library under ``torch.ops.ssm_kernels`` and re-exported here
as plain functions (see API.md for the contract).
"""
import torch

from ._build_check import check_torch_version, load_build_config

_BUILD_CONFIG = load_build_config()
if _BUILD_CONFIG is not None:
    check_torch_version(_BUILD_CONFIG.TORCH_VERSION, torch.__version__)

try:
    from . import _C  # noqa: F401  (loads the library; registers the op schemas and kernels)
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "ssm_kernels._C is missing: build the package first (`pip install --no-build-isolation -e .` "
        "or `make build`)"
    ) from exc

from . import reference  # noqa: E402
from . import packing  # noqa: E402
from .ops import *  # noqa: E402,F401,F403
from .ops import __all__ as _ops_all  # noqa: E402

__version__ = "0.1.0"
__all__ = list(_ops_all) + ["reference", "packing", "build_info"]


def parse_build_info(text: str) -> dict:
    """The `key=value;key=value` string of torch.ops.ssm_kernels.build_info() as a dict of strings.

    Values never contain ';' (the arch list is space-separated); an item without '=' (as an older
    build's ';'-separated arch list produced) is folded back into the value before it.
    """
    info = {}
    key = None
    for item in text.split(";"):
        if "=" in item or key is None:
            key, _, value = item.partition("=")
            info[key] = value
        else:
            info[key] = f"{info[key]} {item}".strip()
    return info


def build_info() -> dict:
    """What this build contains: CUDA kernels and archs, CPU ISA, OpenMP, the torch it was built
    against ("torch_built", None when unknown) and the running torch ("torch")."""
    info = parse_build_info(torch.ops.ssm_kernels.build_info())
    info["cuda"] = info.get("cuda") == "1"
    info["cuda_archs"] = info.get("cuda_archs", "").split()
    info["torch"] = torch.__version__
    info["torch_built"] = getattr(_BUILD_CONFIG, "TORCH_VERSION", None)
    info["cuda_version_built"] = getattr(_BUILD_CONFIG, "CUDA_VERSION", None)
    info["cuda_available"] = torch.cuda.is_available()
    return info
