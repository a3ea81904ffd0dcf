"""Which implementation serves which device, and why the others are absent here.

The dispatch table maps a backend name to a function ``(student, teacher, k, hard) -> loss_rows`` on
``(rows, C)`` inputs. ``"auto"`` picks Triton for CUDA tensors when it imports, else the CUDA
extension; the C++ kernel for CPU tensors.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from . import _ext, expsum, ops  # noqa: F401  (expsum defines rkkd::kendall_expsum before _cpu loads)
from .reference import kendall_reference_rows

RowsLoss = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

_CPU_MISSING: Optional[str] = _ext.load("_cpu")
_CUDA_MISSING: Optional[str] = _ext.load("_cuda")

try:
    from . import triton_kernel  # noqa: E402  (registers rkkd::kendall_triton)
    from . import triton_expsum  # noqa: E402,F401  (registers rkkd::kendall_expsum_triton)

    _TRITON_MISSING: Optional[str] = None
except ImportError as err:  # Triton is optional: the CUDA extension serves GPUs without it
    triton_kernel = None
    _TRITON_MISSING = f"triton does not import ({err}); `pip install triton` to use it"
except Exception as err:  # a Triton that imports but fails to set up must not break the package
    triton_kernel = None
    _TRITON_MISSING = f"the Triton backend failed to load ({type(err).__name__}: {err})"


def _interpreting_triton() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on ``device`` here, else the reason (naming what to install)."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, not {device.type}"
        return _CPU_MISSING
    if backend == "cuda":
        if _CUDA_MISSING is not None:
            return _CUDA_MISSING
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, not {device.type}"
        return None
    if backend == "triton":
        if _TRITON_MISSING is not None:
            return _TRITON_MISSING
        if device.type == "cuda" or (device.type == "cpu" and _interpreting_triton()):
            return None
        return (
            f"backend 'triton' runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
            f"before rkkd_kernels is imported; got {device.type}"
        )
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def choose(backend: str, device: torch.device) -> str:
    """Resolve ``"auto"`` to a concrete backend for ``device``; check a forced one is usable."""
    if backend == "auto":
        candidates = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        reasons = []
        for name in candidates:
            reason = why_unavailable(name, device)
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}")
        raise RuntimeError(
            f"no fast kendall backend for {device.type} tensors here ({'; '.join(reasons)}); "
            "backend='reference' works everywhere but needs rows * C * C memory"
        )
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    return backend


def _fused(op_name: str) -> RowsLoss:
    def run(student, teacher, k, hard_teacher):
        return ops.call_fused(getattr(torch.ops.rkkd, op_name), student, teacher, k, hard_teacher)

    return run


DISPATCH: Dict[str, RowsLoss] = {
    "reference": kendall_reference_rows,
    "cpu": _fused("kendall"),
    "cuda": _fused("kendall"),
    "triton": _fused("kendall_triton"),
}

# The exponential-sum method of the hard-teacher loss (expsum.py), on the backends that have it.
EXPSUM_DISPATCH: Dict[str, RowsLoss] = {
    "cpu": _fused("kendall_expsum"),
    "triton": _fused("kendall_expsum_triton"),
}


def available_backends() -> Dict[str, Optional[str]]:
    """Each backend name -> None when it has what it needs here, else why not.

    A backend counts as available when its code is built and importable; ``"cuda"`` and ``"triton"``
    still need CUDA tensors (a GPU) to run, which ``torch.cuda.is_available()`` tells.
    """
    cuda_runtime = None if torch.cuda.is_available() else "no CUDA device here"
    return {
        "cpu": _CPU_MISSING,
        "cuda": _CUDA_MISSING or cuda_runtime,
        "triton": _TRITON_MISSING
        or (None if torch.cuda.is_available() or _interpreting_triton() else cuda_runtime),
        "reference": None,
    }
