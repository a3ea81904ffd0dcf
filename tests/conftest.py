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
from rkkd_kernels import _ext, backends  # noqa: E402


class BackendDevice(tuple):
    """A test parameter that unpacks as ``(backend, device)``; ``cpu_variant`` names the CPU
    kernel's ISA variant that the test runs (forced around it by pytest_runtest_call below)."""

    def __new__(cls, backend: str, device: str, cpu_variant=None):
        self = super().__new__(cls, (backend, device))
        self.cpu_variant = cpu_variant
        return self


def fast_backends():
    """Each fast backend on the device it serves here; the CPU kernel once per ISA variant of the
    library that this CPU runs (x86-64-v4 where it has AVX-512, x86-64-v3, the x86-64 baseline)."""
    gpu = torch.cuda.is_available()
    cpu = [BackendDevice("cpu", "cpu", v) for v in _ext.cpu_variants()] or [BackendDevice("cpu", "cpu")]
    return cpu + [BackendDevice("triton", "cuda" if gpu else "cpu"), BackendDevice("cuda", "cuda")]


def backend_params():
    """pytest params for every fast backend; those absent here are skipped with the reason (a CPU
    library that does not load skips here and fails tests/test_build.py)."""
    params = []
    for value in fast_backends():
        name, device = value
        if device == "cuda" and not torch.cuda.is_available():
            reason = f"backend {name!r} needs a CUDA device; none here"
        else:
            reason = backends.why_unavailable(name, torch.device(device))
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        label = f"cpu_{value.cpu_variant}" if value.cpu_variant else name
        params.append(pytest.param(value, id=f"{label}-{device}", marks=marks))
    return params


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Run a test of a CPU variant's parameter with that variant forced (a hook, not a fixture, so
    that hypothesis' tests see no function-scoped fixture)."""
    callspec = getattr(item, "callspec", None)
    params = callspec.params.values() if callspec else ()
    variant = next((p.cpu_variant for p in params if isinstance(p, BackendDevice) and p.cpu_variant), None)
    if variant is None:
        yield
        return
    with _ext.forced_cpu_variant(variant):
        yield


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "packaging: builds an sdist and a wheel and installs them into a fresh virtual environment "
        "(minutes; deselect locally with -m 'not packaging')",
    )


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
