"""Loads the compiled kernels that ship inside the package, and says what is missing and why.

Two libraries, built when the package is built (setup.py), against the LibTorch stable ABI of
torch 2.10, so they load into every torch from 2.10 on:

- ``_C.abi3.so``, the CPU kernels. It holds one copy of the kernels per ISA variant (on x86-64:
  x86-64-v4, x86-64-v3 and the x86-64 baseline), picks the best one this CPU runs when it loads,
  and registers it as the CPU kernel of ``rkkd::kendall`` and ``rkkd::kendall_expsum``.
- ``_cuda.abi3.so``, the CUDA kernel of ``rkkd::kendall``, where the wheel was built with nvcc.

The op schemas are defined in Python (ops.py, expsum.py) before a library loads: the libraries
register implementations only. ``_build_info.json`` beside them records what was built.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import threading
from typing import Dict, Iterator, List, Optional

import torch
from torch.torch_version import TorchVersion

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_LIBRARY = "_C"
CUDA_LIBRARY = "_cuda"
# The stable ABI version the libraries were built for (setup.py's TORCH_TARGET).
TORCH_FLOOR = "2.10"


def build_info() -> Dict[str, object]:
    """What setup.py built (empty when the package was not built: a clone before its build)."""
    try:
        with open(os.path.join(HERE, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _library_path(name: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(HERE, f"{name}.*so")) + glob.glob(os.path.join(HERE, f"{name}.*pyd")))
    return found[0] if found else None


class Library:
    """One compiled library: loaded at most once per process; a failure is kept as ``problem``."""

    def __init__(self, name: str, label: str) -> None:
        self.name, self.label = name, label
        self.path: Optional[str] = None
        self.problem: Optional[str] = None
        self.handle: Optional[ctypes.CDLL] = None
        self._lock = threading.Lock()
        self._tried = False

    def load(self) -> Optional[str]:
        """Load the library (registering its kernels); None on success, else why not. After the
        first call only an attribute read (torch.compile traces the callers)."""
        if self._tried:
            return self.problem
        with self._lock:
            if not self._tried:
                self.problem = self._load()
                self._tried = True  # after the problem: a thread that sees it sees the answer
        return self.problem

    def _load(self) -> Optional[str]:
        if TorchVersion(torch.__version__) < TORCH_FLOOR:
            return (f"{self.label} needs torch >= {TORCH_FLOOR} (it is built on the LibTorch stable ABI "
                    f"of {TORCH_FLOOR}), this is torch {torch.__version__}: upgrade torch"
                    + ("" if self.name == CPU_LIBRARY else ", or use backend='triton'"))
        if self.name == CUDA_LIBRARY and torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        path = _library_path(self.name)
        if path is None:
            missing = build_info().get("cuda_missing") if self.name == CUDA_LIBRARY else None
            if missing:
                return f"{self.label} is not in this installation: {missing}"
            return (f"{self.label} is not built ({self.name}.abi3.so is missing from {HERE}): "
                    "reinstall rkkd-kernels, or in a clone run `make build`")
        try:
            torch.ops.load_library(path)
            self.handle = ctypes.CDLL(path)
        except OSError as err:
            cause = err.__cause__ or err
            return f"{self.label} ({path}) does not load: {cause}; reinstall rkkd-kernels for this machine"
        self.path = path
        return None

    def text(self, symbol: str) -> str:
        fn = getattr(self.handle, symbol)
        fn.restype = ctypes.c_char_p
        return fn().decode()


CPU = Library(CPU_LIBRARY, "the CPU kernel")
CUDA = Library(CUDA_LIBRARY, "the CUDA kernel")


def cpu_problem() -> Optional[str]:
    """Why backend "cpu" is unavailable here, or None (the library loads with the package)."""
    return CPU.load()


def cuda_problem() -> Optional[str]:
    """Why the CUDA extension is unavailable here, or None. Loaded on first ask: it is only worth
    loading where a GPU is, and loading it costs the CUDA runtime's set-up."""
    return CUDA.load()


def _split(names: str) -> List[str]:
    return [n for n in names.split(",") if n]


def cpu_variants() -> List[str]:
    """The CPU variants compiled in that this CPU runs, best first (every one is tested)."""
    return [] if cpu_problem() else _split(CPU.text("rkkd_cpu_variants_supported"))


def cpu_variants_compiled() -> List[str]:
    return [] if cpu_problem() else _split(CPU.text("rkkd_cpu_variants_compiled"))


def cpu_variant_in_use() -> Optional[str]:
    return None if cpu_problem() else CPU.text("rkkd_cpu_variant_in_use")


@contextlib.contextmanager
def forced_cpu_variant(name: str) -> Iterator[None]:
    """Run the CPU kernels of one variant inside the block (process-wide; for the tests).

    Raises RuntimeError for a variant this build lacks or this CPU cannot run."""
    if cpu_problem():
        raise RuntimeError(f"backend 'cpu' is not available: {CPU.problem}")
    previous = torch.ops.rkkd._force_cpu_variant(name)
    try:
        yield
    finally:
        torch.ops.rkkd._force_cpu_variant(previous)
