"""Loads the compiled extensions that ``setup.py`` builds next to this file.

Each library only registers kernels for ``rkkd::kendall`` (schema in ``ops.py``): ``_cpu`` for the CPU
dispatch key, ``_cuda`` for the CUDA one. Loading one never depends on the other.
"""

from __future__ import annotations

import glob
import os
from typing import Optional

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUILD_HINT = (
    "build it with `make build` (or `pip install --no-build-isolation -e .`) from the repository root"
)


def _find_library(name: str) -> Optional[str]:
    matches = sorted(glob.glob(os.path.join(_HERE, f"{name}.*.so")) + glob.glob(os.path.join(_HERE, f"{name}.so")))
    return matches[0] if matches else None


def load(name: str) -> Optional[str]:
    """Load ``rkkd_kernels/<name>*.so``; return None on success, else why it is not available."""
    path = _find_library(name)
    if path is None:
        return f"the compiled extension rkkd_kernels/{name} is not built; {_BUILD_HINT}"
    try:
        torch.ops.load_library(path)
    except OSError as err:  # a library built against another torch, or missing CUDA runtime
        return f"{os.path.basename(path)} failed to load ({err}); rebuild it: {_BUILD_HINT}"
    return None
