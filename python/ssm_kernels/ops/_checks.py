"""Argument validation shared by the public ops.

Every check raises before any kernel runs, with a message that names the argument and gives the
expected and the actual value. TypeError for a wrong type or dtype, ValueError for the rest.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    shape: Optional[Sequence[Optional[int]]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    device: Optional[torch.device] = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name}: expected {want} dims, got {t.dim()} (shape {tuple(t.shape)})")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def check_optional(name: str, t, **kwargs) -> None:
    if t is not None:
        check_tensor(name, t, **kwargs)


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(
            f"{name}: expected the dtype of {ref_name} ({str(ref.dtype).replace('torch.', '')}), "
            f"got {str(t.dtype).replace('torch.', '')}"
        )


def check_device_supported(name: str, t: torch.Tensor) -> None:
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{name}: expected a cpu or cuda tensor, got device {t.device}")
    if t.device.type == "cuda" and not cuda_built():
        raise ValueError(
            f"{name}: is on {t.device} but this build of ssm_kernels has no CUDA kernels "
            "(rebuild with nvcc available, or SSM_KERNELS_CUDA=1)"
        )


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")


def check_int(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name}: expected >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name}: expected <= {high}, got {value}")


_CUDA_BUILT: Optional[bool] = None


def cuda_built() -> bool:
    global _CUDA_BUILT
    if _CUDA_BUILT is None:
        _CUDA_BUILT = "cuda=1" in torch.ops.ssm_kernels.build_info()
    return _CUDA_BUILT
