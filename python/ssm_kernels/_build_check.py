"""The check `import ssm_kernels` runs before loading _C: the torch the extension was built against
(recorded in _build_config.py by setup.py) against the running torch.

_C links against libtorch's C++ symbols, which change between torch minor releases; loading it
into another torch fails with an `undefined symbol` error at best. A clear ImportError comes first.
"""
from __future__ import annotations

import re

def rebuild_hint(built: tuple[int, int], running: tuple[int, int]) -> str:
    """How to get a build that matches the running torch."""
    return (
        f"install the ssm-kernels wheel built for torch {running[0]}.{running[1]} (its version ends in "
        f"+torch{running[0]}.{running[1]}cpu or +torch{running[0]}.{running[1]}cuNNN, matching torch's CUDA), "
        "or rebuild ssm_kernels against the running torch (`pip install --no-build-isolation -e .` in the "
        f"source tree, or `make build`), or install the torch it was built against (torch=={built[0]}.{built[1]}.*)"
    )


def major_minor(version: str) -> tuple[int, int] | None:
    """(2, 14) for "2.14.1+cu130", "2.14.0a0+git1234"; None when the string has no X.Y."""
    m = re.match(r"\s*(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_torch_version(built: str, running: str) -> None:
    """Raise ImportError when `built` and `running` torch versions differ in major.minor."""
    b, r = major_minor(built), major_minor(running)
    if b is None or r is None or b == r:
        return
    raise ImportError(
        f"ssm_kernels was built against torch {b[0]}.{b[1]} ({built}), running torch {r[0]}.{r[1]} "
        f"({running}): {rebuild_hint(b, r)}"
    )


def load_build_config():
    """The generated ssm_kernels._build_config module, or None when the build did not write one
    (e.g. a CMake build of the library)."""
    try:
        from . import _build_config
    except ImportError:
        return None
    return _build_config
