"""Shared fixtures: every fast backend joins the same parametrized tests.

Without a GPU, the Triton kernel runs under its interpreter on CPU tensors; TRITON_INTERPRET must be
set before rkkd_kernels (and so the @triton.jit kernels) is imported. With one, the suite pins one
Triton configuration (RKKD_TRITON_CONFIG, read at import too).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One Triton configuration for the suite: autotuning would compile and time all four for each
    # new C and flag set, minutes in all. test_triton.py checks each configuration and the tuner.
    os.environ.setdefault("RKKD_TRITON_CONFIG", "64:8")

import rkkd_kernels  # noqa: E402
from rkkd_kernels import backends  # noqa: E402

# (backend, device): each fast backend on the device it serves here.
FAST_BACKENDS = [
    ("cpu", "cpu"),
    ("triton", "cuda" if torch.cuda.is_available() else "cpu"),
    ("cuda", "cuda"),
]


def backend_params():
    """pytest params for every fast backend; those absent here are skipped with the reason."""
    params = []
    for name, device in FAST_BACKENDS:
        reason = None
        if device == "cuda" and not torch.cuda.is_available():
            reason = f"backend {name!r} needs a CUDA device; none here"
        else:
            reason = backends.why_unavailable(name, torch.device(device))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        params.append(pytest.param((name, device), id=f"{name}-{device}", marks=marks))
    return params


def interpreted(backend: str, device: str) -> bool:
    """True when a backend runs under the Triton interpreter (slow: keep shapes small)."""
    return backend == "triton" and device == "cpu"


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_env() -> dict:
    """Environment for running the repository's tools (benchmarks) in a child process: the repo
    on PYTHONPATH, and TRITON_INTERPRET unset (this file sets it for the kernel tests; the tools
    compile or time real kernels)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    return env
