"""Which implementation serves which device, and why the others are absent here.

The dispatch table maps a backend name to a function ``(student, teacher, k, hard) -> loss_rows`` on
``(rows, C)`` inputs. ``"auto"`` picks Triton for CUDA tensors when it imports, else the CUDA
extension; the C++ kernel for CPU tensors.

``rkkd::kendall``'s CPU and CUDA kernels are the compiled libraries that ship in the package
(``_ext.py``): the CPU one is loaded with the package, the CUDA one when a GPU asks for it. Each
registers its kernels itself; a library that cannot load leaves its reason, never an error at import.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Optional

import torch

from . import _ext, expsum, ops  # noqa: F401  (the schemas, defined before a library registers kernels)
from .reference import kendall_reference_rows
from .triton_runtime import INTERPRETING

RowsLoss = Callable[[torch.Tensor, torch.Tensor, float, bool], torch.Tensor]

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

# Load the CPU library now (a millisecond), not while torch.compile traces why_unavailable; the
# CUDA one where a GPU is.
_GPU_AT_IMPORT = torch.cuda.is_available()
_ext.cpu_problem()
if _GPU_AT_IMPORT:
    _ext.cuda_problem()

# The Triton kernels load with the package only where they can run: a CUDA device, or the CPU
# interpreter (TRITON_INTERPRET=1 set before the import). Importing Triton brings torch._inductor
# (about a second); on any other machine the Triton backend can never run, so it is never imported.
# Loading here, at import, keeps the ops defined before torch.compile traces anything.
TRITON_CAN_RUN_HERE = INTERPRETING or _GPU_AT_IMPORT


def _load_triton() -> Optional[str]:
    """None once the Triton ops are registered, else why not (naming what to install)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed; `pip install triton` to use it"
    if not TRITON_CAN_RUN_HERE:
        return None  # installed; loaded nowhere it could not run
    try:
        from . import triton_expsum, triton_pairs  # noqa: F401  (register rkkd::kendall_triton, ...)
    except ImportError as err:  # Triton is optional: the CUDA extension serves GPUs without it
        return f"triton does not import ({err}); `pip install triton` to use it"
    except Exception as err:  # a Triton that imports but fails to set up must not break the package
        return f"the Triton backend failed to load ({type(err).__name__}: {err})"
    return None


_TRITON_MISSING = _load_triton()

NO_GPU = "no CUDA device here"


def _interpreter_problem() -> Optional[str]:
    """Why Triton's CPU interpreter cannot run the kernels here, if it cannot: before Triton 3.8 it
    passes integer kernel arguments as 1-element arrays, which numpy 2 no longer turns into ints
    (seen with Triton 3.2 and 3.6)."""
    import numpy
    import triton
    from torch.torch_version import TorchVersion

    try:
        int(numpy.ones(1))
    except TypeError:
        if TorchVersion(triton.__version__) < (3, 8):
            return (f"backend 'triton' on CPU tensors (TRITON_INTERPRET=1) needs Triton >= 3.8 with "
                    f"numpy {numpy.__version__}: Triton {triton.__version__}'s interpreter passes "
                    f"integer arguments as 1-element arrays, which this numpy does not turn into ints")
    return None


# Read now, not while torch.compile traces why_unavailable.
_INTERPRETER_PROBLEM = _interpreter_problem() if INTERPRETING and _TRITON_MISSING is None else None


def why_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on ``device`` here, else the reason (naming what to install).

    Cheap (torch.compile traces it): the compiled libraries were loaded, or failed to, before.
    """
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs on CPU tensors, not {device.type}"
        return _ext.cpu_problem()
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs on CUDA tensors, not {device.type}"
        return _ext.cuda_problem() if torch.cuda.is_available() else NO_GPU
    if backend == "triton":
        if _TRITON_MISSING is not None:
            return _TRITON_MISSING
        if device.type == "cuda":
            return None if torch.cuda.is_available() else NO_GPU
        if device.type == "cpu" and INTERPRETING:
            return _INTERPRETER_PROBLEM
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


def _device_served(backend: str) -> torch.device:
    """The device whose tensors ``backend`` takes here (the GPU where one is)."""
    if backend in ("cpu", "reference"):
        return torch.device("cpu")
    if backend == "triton" and not torch.cuda.is_available() and INTERPRETING:
        return torch.device("cpu")
    return torch.device("cuda")


def available_backends() -> Dict[str, Optional[str]]:
    """Each backend name -> None when it can run here, else why not.

    The answers are :func:`why_unavailable`'s for the device each backend serves (the GPU where
    one is): a compiled backend whose library is missing or does not load says why.
    """
    return {name: why_unavailable(name, _device_served(name)) for name in BACKENDS if name != "auto"}
