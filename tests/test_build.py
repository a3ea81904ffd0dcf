"""How the compiled kernels are built and loaded (rkkd_kernels/_ext.py): on first use, per ISA
variant, under a cache key, under a lock, once per process when they fail; and what a user sees
when they do (`python -m rkkd_kernels`, available_backends, the RuntimeError of backend="cpu").
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import rkkd_kernels
from conftest import REPO_ROOT, tool_env
from rkkd_kernels import _ext, backends, kendall_loss

X86_ONLY = pytest.mark.skipif(not _ext.is_x86(), reason="the ISA variants are x86-64 levels")


@pytest.mark.parametrize("isa", _ext.tested_cpu_isas())
def test_cpu_kernel_builds_and_registers_each_variant(isa):
    """Where a compiler is, the CPU kernel must build: a failure fails here (the shared suite only
    skips the variant)."""
    ext = _ext.cpu_extension(isa)
    assert ext.load() is None, ext.problem
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rkkd::{_ext.cpu_op_name('kendall', isa)}", "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rkkd::kendall", "CPU")


@X86_ONLY
def test_cache_key_names_the_isa(monkeypatch):
    """A cache shared between machines (a home folder over NFS) must never hand one CPU's build to
    another: the folder, and the flags it was built with, change with the variant."""
    folders = {}
    for isa in ("x86-64-v4", "x86-64-v3"):
        monkeypatch.setenv("RKKD_CPU_ISA", isa)
        ext = _ext.cpu_extension()
        assert ext.isa == isa
        assert f"-march={isa}" in ext.key()["cflags"]
        folders[isa] = ext.build_dir()
        assert _ext.isa_token(isa) in os.path.basename(folders[isa])
    assert folders["x86-64-v4"] != folders["x86-64-v3"]
    monkeypatch.delenv("RKKD_CPU_ISA")
    assert _ext.cpu_extension().isa == _ext.supported_isas()[0]
    assert not any("native" in flag for flag in _ext.cpu_cflags(_ext.supported_isas()[0]))


def test_cache_key_changes_with_torch_and_sources(monkeypatch, tmp_path):
    ext = _ext.Extension("cpu", _ext.supported_isas()[0])
    before = ext.build_name()
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    assert ext.build_name() != before
    monkeypatch.undo()
    assert ext.build_name() == before
    shutil.copytree(_ext.source_dir(), tmp_path / "csrc")
    with open(tmp_path / "csrc" / "pair_math.h", "a") as f:
        f.write("// an edit\n")
    monkeypatch.setattr(_ext, "source_dir", lambda: str(tmp_path / "csrc"))
    assert ext.build_name() != before


@X86_ONLY
def test_baseline_binary_has_no_avx512_register():
    """The x86-64-v3 build must run on an AVX2-only CPU: not one zmm register in its code (and the
    AVX-512 build, where this CPU runs it, has them, so the check sees them when they are there)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    if "x86-64-v3" not in _ext.supported_isas():
        pytest.skip("this CPU cannot load the x86-64-v3 build")

    def zmm_lines(isa):
        ext = _ext.cpu_extension(isa)
        assert ext.load() is None, ext.problem
        code = subprocess.run([objdump, "-d", "--no-show-raw-insn", ext.path], capture_output=True,
                              text=True, check=True).stdout
        assert "vfmadd" in code or "vdivp" in code  # it is the vector kernel we disassembled
        return [line for line in code.splitlines() if "zmm" in line]

    assert zmm_lines("x86-64-v3") == []
    if "x86-64-v4" in _ext.supported_isas():
        assert zmm_lines("x86-64-v4")


def test_a_forced_variant_that_cannot_run_is_refused(monkeypatch):
    s = torch.randn(3, 7)
    monkeypatch.setenv("RKKD_CPU_ISA", "pentium")
    with pytest.raises(RuntimeError, match="RKKD_CPU_ISA='pentium'"):
        kendall_loss(s, s, backend="cpu")
    assert "RKKD_CPU_ISA" in rkkd_kernels.available_backends()["cpu"]
    if _ext.is_x86():  # a CPU with AVX2 but no AVX-512, forced to the AVX-512 variant
        no_avx512 = frozenset(f for f in _ext.cpu_flags() if not f.startswith("avx512"))
        monkeypatch.setattr(_ext, "_CPU_FLAGS", no_avx512 | {"avx", "avx2", "fma", "bmi1", "bmi2",
                                                             "f16c", "abm", "movbe", "xsave"})
        assert _ext.supported_isas()[0] == "x86-64-v3"
        monkeypatch.setenv("RKKD_CPU_ISA", "x86-64-v4")
        with pytest.raises(RuntimeError, match="lacks.*avx512"):
            kendall_loss(s, s, backend="cpu")


def test_ahead_of_time_binaries_of_another_torch_are_not_loaded(monkeypatch, tmp_path):
    """A wheel built with RKKD_BUILD_EXT=1 under one torch, installed beside another: its binaries
    are left alone (torch has no stable C++ ABI) and the kernel is built on first use."""
    info = {**_ext.torch_identity(), "sources": _ext.sources_hash(),
            "cpu": {isa: "rkkd_cpu.so" for isa in _ext.known_isas()}, "cuda": None}
    assert _ext.prebuilt_mismatch(info) is None
    (tmp_path / "rkkd_cpu.so").write_bytes(b"")
    (tmp_path / _ext.PREBUILT_INFO).write_text(json.dumps(info))
    monkeypatch.setattr(_ext, "PREBUILT_DIR", str(tmp_path))
    ext = _ext.Extension("cpu", _ext.supported_isas()[0])
    assert ext._prebuilt_path() == (str(tmp_path / "rkkd_cpu.so"), None)
    for field, other in (("torch", "2.0.0"), ("torch_git", "0" * 40), ("python", "cpython-38")):
        (tmp_path / _ext.PREBUILT_INFO).write_text(json.dumps({**info, field: other}))
        path, why = ext._prebuilt_path()
        assert path is None and field in why and "first use" in why
    (tmp_path / _ext.PREBUILT_INFO).write_text(json.dumps({**info, "sources": "0" * 64}))
    assert ext._prebuilt_path()[0] is None


def _fake_build(counter, seconds=0.0, error=None):
    """A stand-in for the compiler: counts its calls in a file, takes ``seconds``, fails with
    ``error`` or leaves an (empty) library."""

    def compile_and_load(self, build_dir):
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(seconds)
        if error:
            raise RuntimeError(error)
        open(os.path.join(build_dir, self.build_name() + ".so"), "wb").close()

    return compile_and_load


def _load_in_child(queue):
    ext = _ext.Extension("cpu", _ext.supported_isas()[0])
    queue.put((ext.load(), ext.origin))


def test_concurrent_processes_build_once(monkeypatch, tmp_path):
    """Eight DDP ranks that start at once: one builds, the others wait for it and load its build."""
    counter = tmp_path / "builds"
    monkeypatch.setenv("RKKD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_ext.Extension, "_compile_and_load", _fake_build(counter, seconds=1.0))
    monkeypatch.setattr(_ext.Extension, "_load_library", lambda self, path: None)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_load_in_child, args=(queue,)) for _ in range(8)]
    for child in children:
        child.start()
    results = [queue.get(timeout=120) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    assert [problem for problem, _ in results] == [None] * 8
    assert sorted(origin for _, origin in results) == ["built now"] + ["cache"] * 7
    assert len(counter.read_text().split()) == 1


def test_a_failed_build_is_tried_once_per_process(monkeypatch, tmp_path):
    counter = tmp_path / "builds"
    monkeypatch.setenv("RKKD_CACHE_DIR", str(tmp_path / "cache"))
    error = "Error building extension\nkendall_cpu.cpp:12:1: error: expected ';' before '}' token"
    monkeypatch.setattr(_ext.Extension, "_compile_and_load", _fake_build(counter, error=error))
    ext = _ext.Extension("cpu", _ext.supported_isas()[0])
    for _ in range(3):
        problem = ext.load()
        assert "failed to build" in problem and "expected ';'" in problem
        assert "fix: the compiler (" in problem and "rejected the code" in problem
        with pytest.raises(RuntimeError, match="(?s)backend 'cpu' is not available.*expected ';'"):
            ext.op("kendall")
    assert len(counter.read_text().split()) == 1 and ext.attempts == 1
    with open(os.path.join(ext.build_dir(), "build.log")) as f:
        assert "expected ';'" in f.read()


def test_a_cache_folder_that_cannot_be_written_is_a_clear_reason(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("RKKD_CACHE_DIR", str(tmp_path / "a_file" / "cache"))
    monkeypatch.setattr(_ext, "PREBUILT_DIR", str(tmp_path / "none"))
    problem = _ext.Extension("cpu", _ext.supported_isas()[0]).load()
    assert "cannot be built into" in problem and "RKKD_CACHE_DIR" in problem


# A child process with a compiler that fails every command (CXX=false) and an empty cache.
BROKEN_COMPILER = r"""
import json, sys, time
import torch
import rkkd_kernels
from rkkd_kernels import _ext, kendall_loss

_ext.PREBUILT_DIR = "/nonexistent"  # a clone built with RKKD_BUILD_EXT=1 must not hide the build
out = {}
s, t = torch.randn(4, 33, dtype=torch.float64), torch.randn(4, 33, dtype=torch.float64)
for attempt in range(2):
    start = time.perf_counter()
    try:
        kendall_loss(s, t, backend="cpu")
        out["cpu"] = "ran"
    except RuntimeError as err:
        out[f"error{attempt}"] = str(err)
    out[f"seconds{attempt}"] = time.perf_counter() - start
out["attempts"] = _ext.cpu_extension().attempts
out["available"] = rkkd_kernels.available_backends()
want = kendall_loss(s, t, backend="reference")
if out["available"]["triton"] is None:
    out["triton_error"] = (kendall_loss(s, t, backend="triton") - want).abs().item()
print(json.dumps(out))
"""


def test_a_broken_compiler_leaves_the_package_working(tmp_path):
    env = tool_env()
    env.update(CXX="false", RKKD_CACHE_DIR=str(tmp_path / "cache"), TRITON_INTERPRET="1")
    env.pop("RKKD_CPU_ISA", None)
    run = subprocess.run([sys.executable, "-c", BROKEN_COMPILER], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "cpu" not in out, "the CPU kernel ran without a compiler"
    first = out["error0"]
    assert first.startswith("backend 'cpu' is not available: the CPU kernel")
    log_lines, fix = first.split("\n  fix: ")
    assert "failed to build" in log_lines and "full log: " in log_lines
    assert "'false'" in log_lines  # the key line: the compiler's command that failed
    assert fix.startswith("install a C++ compiler") and "tried: false" in fix
    assert "not available" in out["error1"] and out["attempts"] == 1  # not built again
    assert out["seconds1"] < 1.0
    assert out["available"]["cpu"] in first
    assert out["available"]["reference"] is None
    # The Triton backend (interpreted here) is unaffected: as available as in this process, and
    # where it is, right.
    assert out["available"]["triton"] == backends.why_unavailable("triton", torch.device("cpu"))
    if out["available"]["triton"] is None:
        assert out["triton_error"] < 1e-12


def test_main_reports_versions_backends_and_the_variant(tmp_path):
    env = tool_env()
    env.pop("RKKD_CPU_ISA", None)
    run = subprocess.run([sys.executable, "-m", "rkkd_kernels"], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert text.startswith(f"rkkd_kernels {rkkd_kernels.__version__} ")
    assert f"torch {torch.__version__} " in text
    assert f"kernel variant in use: {_ext.supported_isas()[0]}" in text
    assert f"built kernels: {_ext.cache_dir()}" in text
    report = {line.split()[0]: line.split(None, 1)[1] for line in text.split("backends:\n")[1].splitlines()}
    assert set(report) == set(backends.BACKENDS) - {"auto"}
    assert report["cpu"] == "available" and report["reference"] == "available"
    if not torch.cuda.is_available():
        assert report["cuda"] == f"unavailable: {backends.NO_GPU}"
