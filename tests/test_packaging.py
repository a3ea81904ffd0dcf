"""The package as a user gets it: a wheel and an sdist built with pip's and build's defaults (build
isolation: torch comes from the build requirements), the wheel an abi3 binary with the CPU library
compiled in, each installed into a fresh virtual environment beside the pinned torch, used from a
folder outside the checkout (the shipped kernel, against the reference, with nothing compiled at
run time), then uninstalled without a trace.

The fresh environment sees the pinned torch (and numpy, ninja) of the environment running the
tests through a .pth file, instead of a 5.4 GB reinstall of the same wheel: pip then finds the
dependencies satisfied and installs only rkkd-kernels into the fresh environment.

A few minutes (two builds of the CPU library: the wheel, and the sdist's install; the CUDA kernel is
left out with RKKD_BUILD_CUDA=0, tests/test_cuda_ext.py checks its build):
deselect with ``-m "not packaging"`` while working; CI runs it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import pytest
import torch

import rkkd_kernels
from conftest import REPO_ROOT

pytestmark = pytest.mark.packaging

# Run in the fresh environment, from a folder outside the checkout, after an install.
USE = r"""
import json, os, sys, time
from importlib import metadata
import torch
import rkkd_kernels
from rkkd_kernels import kendall_loss

g = torch.Generator().manual_seed(0)
s = torch.randn(6, 300, dtype=torch.float64, generator=g).requires_grad_(True)
t = torch.randn(6, 300, dtype=torch.float64, generator=g)
start = time.perf_counter()
loss = kendall_loss(s, t, backend="cpu")
first_call_s = time.perf_counter() - start
(grad,) = torch.autograd.grad(loss, s)
s_ref = s.detach().clone().requires_grad_(True)
want = kendall_loss(s_ref, t, backend="reference")
(grad_want,) = torch.autograd.grad(want, s_ref)
print(json.dumps({
    "file": rkkd_kernels.__file__,
    "version": rkkd_kernels.__version__,
    "metadata_version": metadata.version("rkkd-kernels"),
    "loss_error": abs(loss.item() - want.item()),
    "grad_error": (grad - grad_want).abs().max().item(),
    "first_call_s": first_call_s,
    "cpu_kernel": rkkd_kernels._ext.CPU.path,
}))
"""


def _run(cmd, cwd, env=None, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


# The isolated build environments get the torch that runs these tests (a local wheel here): pip >=
# 26.2 applies no install constraint there, and would fetch the newest torch (GBs) for every build.
BUILD_CONSTRAINTS = os.path.join(tempfile.gettempdir(), f"rkkd-build-constraints-{os.getpid()}.txt")


def _clean_env(**extra):
    """No PYTHONPATH (which points at the checkout under `make test`); the CUDA kernel left out
    (tests/test_cuda_ext.py checks its build); build environments pinned to this torch."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "TRITON_INTERPRET", "VIRTUAL_ENV")}
    with open(BUILD_CONSTRAINTS, "w") as f:
        f.write(f"torch=={torch.__version__.split('+')[0]}\n")
    env.update(RKKD_BUILD_CUDA="0", PIP_BUILD_CONSTRAINT=BUILD_CONSTRAINTS)
    env.update(extra)
    return env


def _files(root):
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


def _installed_files(python, cwd, env):
    """The absolute paths of the files that pip recorded for rkkd-kernels."""
    script = ("import json, importlib.metadata as m; d = m.distribution('rkkd-kernels'); "
              "print(json.dumps([str(d.locate_file(f)) for f in d.files]))")
    return [os.path.realpath(p) for p in json.loads(_run([python, "-c", script], cwd=cwd, env=env))]


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    """(wheel, sdist), built from the checkout with pip's and build's defaults (isolated)."""
    out = tmp_path_factory.mktemp("dist")
    env = _clean_env()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(out), REPO_ROOT], cwd=out, env=env)
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), REPO_ROOT], cwd=out, env=env)
    (wheel,) = glob.glob(str(out / "*.whl"))
    (sdist,) = glob.glob(str(out / "*.tar.gz"))
    return wheel, sdist


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh virtual environment that sees the pinned torch of this one (see the module doc)."""
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", str(root)], cwd=root)
    python = str(root / "bin" / "python")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip()
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "zz_pinned_torch.pth"), "w") as f:
        f.write(torch_site + "\n")
    return root, python


def _sources():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO_ROOT, "csrc", "*"))
                  if p.endswith((".h", ".cpp", ".cu", ".cuh")))


def test_wheel_is_an_abi3_binary_with_the_cpu_library(dists):
    wheel, _ = dists
    assert wheel.endswith(".whl") and "-cp310-abi3-" in os.path.basename(wheel), wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "rkkd_kernels/_C.abi3.so" in names and "rkkd_kernels/_build_info.json" in names
    assert not [n for n in names if "_cuda" in n]  # built with RKKD_BUILD_CUDA=0
    assert not [n for n in names if n.startswith("rkkd_kernels/csrc/") or n.endswith((".cpp", ".cu"))]
    assert not [n for n in names if n.startswith(("tests/", "train/", "benchmarks/"))]
    print(f"{os.path.basename(wheel)}: {os.path.getsize(wheel) / 1e6:.2f} MB")


def test_sdist_holds_every_file_the_build_needs(dists):
    _, sdist = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ["pyproject.toml", "setup.py", "README.md"] + [f"csrc/{s}" for s in _sources()]:
        assert needed in names, f"{needed} is missing from {os.path.basename(sdist)}"
    py_files = glob.glob(os.path.join(REPO_ROOT, "rkkd_kernels", "*.py"))
    for path in py_files:
        assert f"rkkd_kernels/{os.path.basename(path)}" in names
    assert not [n for n in names if n.endswith(".so")]


@pytest.mark.parametrize("which", ["wheel", "sdist"])
def test_install_use_uninstall(which, dists, venv, tmp_path):
    root, python = venv
    dist = dists[0] if which == "wheel" else dists[1]
    elsewhere = tmp_path / "elsewhere"  # outside the checkout: nothing found from the clone
    elsewhere.mkdir()
    env = _clean_env()
    _run([python, "-m", "pip", "install", dist], cwd=elsewhere, env=env)
    ours = _installed_files(python, elsewhere, env)
    assert any(p.endswith(os.path.join("rkkd_kernels", "_C.abi3.so")) for p in ours)
    used = json.loads(_run([python, "-c", USE], cwd=elsewhere, env=env).strip().splitlines()[-1])
    print(f"{which}: first call of backend='cpu' {used['first_call_s'] * 1e3:.1f} ms")
    assert used["file"].startswith(str(root)), used["file"]
    assert used["version"] == used["metadata_version"] == rkkd_kernels.__version__
    assert used["loss_error"] < 1e-12 and used["grad_error"] < 1e-12
    assert used["cpu_kernel"].startswith(str(root))  # the library installed with the package
    report = _run([python, "-m", "rkkd_kernels"], cwd=elsewhere, env=env)
    assert "cpu        available" in report
    _run([python, "-m", "pip", "uninstall", "-y", "rkkd-kernels"], cwd=elsewhere, env=env)
    # Nothing that pip installed for us, and nothing of our name (bytecode written at import, a
    # folder left empty), stays behind; the dependencies pip may have added are not ours.
    left = [p for p in ours if os.path.exists(p)]
    left += [p for p in _files(root) if "rkkd" in os.path.relpath(p, root).lower()]
    assert left == [], f"pip uninstall left {sorted(set(left))}"
