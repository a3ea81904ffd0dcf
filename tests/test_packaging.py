"""The package as a user gets it: an sdist and a wheel built with pip's defaults (build isolation,
no torch in the build environment), each installed into a fresh virtual environment beside the
pinned torch, used from a folder outside the checkout (the CPU kernel built on first use, against
the reference), then uninstalled without a trace. And a wheel with the kernels built ahead of time
(RKKD_BUILD_EXT=1): its x86-64-v3 baseline has no AVX-512 instruction, and it loads without a build.

The fresh environment sees the pinned torch (and numpy, ninja) of the environment running the
tests through a .pth file, instead of a 5.4 GB reinstall of the same wheel: pip then finds the
dependencies satisfied and installs only rkkd-kernels into the fresh environment.

A few minutes (mostly four builds of the CPU kernel: one per install, each with an empty cache, and
the two variants of the ahead-of-time wheel):
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
    "cpu_kernel": rkkd_kernels._ext.cpu_extension().path,
}))
"""


def _run(cmd, cwd, env=None, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _clean_env(**extra):
    """No PYTHONPATH (which points at the checkout under `make test`), no forced variant."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "RKKD_CPU_ISA", "TRITON_INTERPRET", "VIRTUAL_ENV")}
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


def test_wheel_is_pure_python_and_holds_the_sources(dists):
    wheel, _ = dists
    assert wheel.endswith("-py3-none-any.whl"), wheel  # no binary: built on first use
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.split("/")[-1] for n in names if n.startswith("rkkd_kernels/csrc/")) == _sources()
    assert not [n for n in names if n.endswith(".so")]
    assert not [n for n in names if n.startswith(("tests/", "train/", "benchmarks/"))]


def test_sdist_holds_every_file_the_build_needs(dists):
    _, sdist = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ["pyproject.toml", "setup.py", "README.md"] + [f"csrc/{s}" for s in _sources()]:
        assert needed in names, f"{needed} is missing from {os.path.basename(sdist)}"
    py_files = glob.glob(os.path.join(REPO_ROOT, "rkkd_kernels", "*.py"))
    for path in py_files:
        assert f"rkkd_kernels/{os.path.basename(path)}" in names


@pytest.mark.parametrize("which", ["wheel", "sdist"])
def test_install_use_uninstall(which, dists, venv, tmp_path):
    root, python = venv
    dist = dists[0] if which == "wheel" else dists[1]
    elsewhere = tmp_path / "elsewhere"  # outside the checkout: nothing found from the clone
    elsewhere.mkdir()
    env = _clean_env(RKKD_CACHE_DIR=str(tmp_path / "cache"))  # empty: the kernel is built now
    _run([python, "-m", "pip", "install", dist], cwd=elsewhere, env=env)
    ours = _installed_files(python, elsewhere, env)
    assert any(p.endswith(os.path.join("rkkd_kernels", "csrc", "pair_math.h")) for p in ours)
    used = json.loads(_run([python, "-c", USE], cwd=elsewhere, env=env).strip().splitlines()[-1])
    print(f"{which}: first call of backend='cpu' (building the kernel) {used['first_call_s']:.1f} s")
    assert used["file"].startswith(str(root)), used["file"]
    assert used["version"] == used["metadata_version"] == rkkd_kernels.__version__
    assert used["loss_error"] < 1e-12 and used["grad_error"] < 1e-12
    assert used["cpu_kernel"].startswith(str(tmp_path / "cache"))
    report = _run([python, "-m", "rkkd_kernels"], cwd=elsewhere, env=env)
    assert "cpu        available" in report
    _run([python, "-m", "pip", "uninstall", "-y", "rkkd-kernels"], cwd=elsewhere, env=env)
    # Nothing that pip installed for us, and nothing of our name (bytecode written at import, a
    # folder left empty), stays behind; the dependencies pip may have added are not ours.
    left = [p for p in ours if os.path.exists(p)]
    left += [p for p in _files(root) if "rkkd" in os.path.relpath(p, root).lower()]
    assert left == [], f"pip uninstall left {sorted(set(left))}"


@pytest.fixture(scope="module")
def prebuilt_wheel(tmp_path_factory):
    """A wheel with the kernels built ahead of time (RKKD_BUILD_EXT=1), against this torch."""
    out = tmp_path_factory.mktemp("prebuilt")
    env = _clean_env(RKKD_BUILD_EXT="1", RKKD_BUILD_CUDA="0")  # the CUDA build has its own test
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(out),
          REPO_ROOT], cwd=out, env=env)
    (wheel,) = glob.glob(str(out / "*.whl"))
    return wheel


@pytest.mark.skipif(not rkkd_kernels._ext.is_x86(), reason="the ISA variants are x86-64 levels")
def test_prebuilt_wheel_has_a_portable_baseline_and_loads_without_a_build(prebuilt_wheel, venv, tmp_path):
    """The x86-64-v3 binary of an ahead-of-time wheel has no AVX-512 register (it runs on an
    AVX2-only CPU); the x86-64-v4 one has them; installed, the package loads the binary of its CPU
    and builds nothing."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    assert not prebuilt_wheel.endswith("-none-any.whl")
    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(prebuilt_wheel).extractall(unpacked)
    prebuilt = unpacked / "rkkd_kernels" / "_prebuilt"
    info = json.loads((prebuilt / "build_info.json").read_text())
    assert info["torch"] == torch.__version__ and sorted(info["cpu"]) == ["x86-64-v3", "x86-64-v4"]
    zmm = {}
    for isa, name in info["cpu"].items():
        code = _run([objdump, "-d", "--no-show-raw-insn", str(prebuilt / name)], cwd=tmp_path)
        assert "vfmadd" in code or "vdivp" in code
        zmm[isa] = sum("zmm" in line for line in code.splitlines())
    assert zmm["x86-64-v3"] == 0 and zmm["x86-64-v4"] > 0, zmm

    root, python = venv
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cache = tmp_path / "cache"
    env = _clean_env(RKKD_CACHE_DIR=str(cache))
    _run([python, "-m", "pip", "install", prebuilt_wheel], cwd=elsewhere, env=env)
    ours = _installed_files(python, elsewhere, env)
    used = json.loads(_run([python, "-c", USE], cwd=elsewhere, env=env).strip().splitlines()[-1])
    assert used["loss_error"] < 1e-12 and used["grad_error"] < 1e-12
    assert os.path.basename(used["cpu_kernel"]) == info["cpu"][rkkd_kernels._ext.supported_isas()[0]]
    assert not cache.exists(), "a build ran although the installed binaries fit this torch"
    _run([python, "-m", "pip", "uninstall", "-y", "rkkd-kernels"], cwd=elsewhere, env=env)
    left = [p for p in ours if os.path.exists(p)]
    left += [p for p in _files(root) if "rkkd" in os.path.relpath(p, root).lower()]
    assert left == [], f"pip uninstall left {sorted(set(left))}"
