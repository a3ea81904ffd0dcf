"""The compiled kernels as built by setup.py (``make test`` builds them in place first): one CPU
library with its ISA variants, each in its own namespace and with no instruction above its level;
libraries that use torch only through the stable ABI's C shim; loaded with the package, with no
compiler at run time; and what a user sees when something is missing (`python -m rkkd_kernels`,
available_backends, the RuntimeError of a backend).
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import rkkd_kernels
from conftest import REPO_ROOT, tool_env
from rkkd_kernels import _ext, backends, kendall_loss

IS_X86 = platform.machine().lower() in ("x86_64", "amd64")
X86_ONLY = pytest.mark.skipif(not IS_X86, reason="the ISA variants are x86-64 levels")


def _tool(name):
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} (binutils) is not installed")
    return path


def variant_objects():
    """The variants' object files of the in-place build: {variant: [paths]}."""
    found = {}
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, "build", "temp*", "cpu_variants", "*", "*.o"))):
        found.setdefault(os.path.basename(os.path.dirname(path)), []).append(path)
    assert found, "no variant objects under build/: build in place first (`make build`)"
    return found


def test_cpu_library_loads_and_registers_its_kernels():
    assert _ext.cpu_problem() is None, _ext.cpu_problem()
    for op in ("kendall", "kendall_expsum"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rkkd::{op}", "CPU")
    variants = _ext.cpu_variants()
    assert variants and _ext.cpu_variant_in_use() == variants[0]
    assert variants == [v for v in _ext.cpu_variants_compiled() if v in variants]
    if IS_X86:
        assert _ext.cpu_variants_compiled() == ["x86-64-v4", "x86-64-v3", "x86-64"]
        assert variants[-1] == "x86-64"  # the baseline runs on every x86-64 CPU


@X86_ONLY
def test_variant_objects_define_no_symbol_twice():
    """Variants compiled with different -march must not share a symbol: the linker would keep one
    copy of it for all, and a lower CPU could run another variant's instructions. The one name they
    share is DW.ref.__gxx_personality_v0, a pointer to the C++ runtime's exception personality
    (data, the same in every object)."""
    nm = _tool("nm")
    owners = {}
    for variant, objects in variant_objects().items():
        for obj in objects:
            out = subprocess.run([nm, "--defined-only", obj], capture_output=True, text=True, check=True)
            for line in out.stdout.splitlines():
                _, kind, name = line.split(maxsplit=2)
                if kind.isupper() or kind in "uvw":  # global or weak: visible to the linker
                    owners.setdefault(name, set()).add(variant)
    shared = {name: v for name, v in owners.items() if len(v) > 1 and name != "DW.ref.__gxx_personality_v0"}
    assert shared == {}, f"symbols defined by several variants: {sorted(shared)[:20]}"
    assert sorted(variant_objects()) == sorted(_ext.cpu_variants_compiled())


@X86_ONLY
def test_each_variant_uses_no_register_above_its_level():
    """The baseline has no ymm or zmm register, x86-64-v3 no zmm; x86-64-v4 has them (so the check
    sees them where they are)."""
    objdump = _tool("objdump")
    counts = {}
    for variant, objects in variant_objects().items():
        code = "".join(subprocess.run([objdump, "-d", "--no-show-raw-insn", o], capture_output=True,
                                      text=True, check=True).stdout for o in objects)
        assert "mulp" in code  # the vector kernels are what was disassembled
        counts[variant] = {reg: sum(reg in line for line in code.splitlines()) for reg in ("ymm", "zmm")}
    assert counts["x86-64"] == {"ymm": 0, "zmm": 0}, counts
    assert counts["x86-64-v3"]["zmm"] == 0 and counts["x86-64-v3"]["ymm"] > 0, counts
    assert counts["x86-64-v4"]["zmm"] > 0, counts


def test_libraries_use_torch_only_through_the_c_shim():
    """No C++ symbol of torch (c10::, at::, torch::) in what the libraries import: only the stable
    ABI's C functions, so they load into any torch that has them."""
    nm = _tool("nm")
    libraries = [p for p in (_ext._library_path(_ext.CPU_LIBRARY), _ext._library_path(_ext.CUDA_LIBRARY)) if p]
    assert libraries
    for lib in libraries:
        out = subprocess.run([nm, "-D", "--undefined-only", "--demangle", lib], capture_output=True,
                             text=True, check=True).stdout
        torch_cpp = [l for l in out.splitlines() if any(ns in l for ns in ("c10::", "at::", "torch::"))]
        assert torch_cpp == [], f"{os.path.basename(lib)} imports torch C++ symbols: {torch_cpp[:10]}"
        assert "aoti_torch_" in out or "torch_" in out


def test_forcing_a_variant_checks_it():
    with pytest.raises(RuntimeError, match="no CPU variant named pentium"):
        with _ext.forced_cpu_variant("pentium"):
            pass
    unsupported = [v for v in _ext.cpu_variants_compiled() if v not in _ext.cpu_variants()]
    if unsupported:  # e.g. x86-64-v4 on a CPU without AVX-512: refused, never run
        with pytest.raises(RuntimeError, match="this CPU cannot run the"):
            with _ext.forced_cpu_variant(unsupported[0]):
                pass
    before = _ext.cpu_variant_in_use()
    with _ext.forced_cpu_variant(_ext.cpu_variants()[-1]):
        assert _ext.cpu_variant_in_use() == _ext.cpu_variants()[-1]
    assert _ext.cpu_variant_in_use() == before


def test_a_torch_below_the_floor_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.9.1")
    problem = _ext.Library(_ext.CPU_LIBRARY, "the CPU kernel").load()
    assert "needs torch >= 2.10" in problem and "2.9.1" in problem and "upgrade torch" in problem
    problem = _ext.Library(_ext.CUDA_LIBRARY, "the CUDA kernel").load()
    assert "backend='triton'" in problem


def test_a_missing_library_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "HERE", str(tmp_path))
    problem = _ext.Library(_ext.CPU_LIBRARY, "the CPU kernel").load()
    assert "is not built" in problem and "_C.abi3.so" in problem
    (tmp_path / "_build_info.json").write_text(json.dumps({"cuda_missing": "no nvcc was found"}))
    problem = _ext.Library(_ext.CUDA_LIBRARY, "the CUDA kernel").load()
    assert problem == "the CUDA kernel is not in this installation: no nvcc was found"


def test_a_library_that_does_not_load_is_a_reason(monkeypatch, tmp_path):
    (tmp_path / "_C.abi3.so").write_bytes(b"not a library")
    monkeypatch.setattr(_ext, "HERE", str(tmp_path))
    problem = _ext.Library(_ext.CPU_LIBRARY, "the CPU kernel").load()
    assert "does not load" in problem and "reinstall" in problem


# A new process with no compiler (CXX=/bin/false) and an empty home: the first call runs the
# shipped kernel; the run writes no file.
FIRST_CALL = r"""
import json, time
import torch
from rkkd_kernels import kendall_loss
s, t = torch.randn(1, 2), torch.randn(1, 2)
start = time.perf_counter()
kendall_loss(s, t, backend="cpu")
first = time.perf_counter() - start
print(json.dumps({"first_call_s": first}))
"""


def test_first_call_compiles_nothing_and_writes_nothing(tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = tool_env()
    env.update(CXX="/bin/false", CC="/bin/false", HOME=str(home), PYTHONDONTWRITEBYTECODE="1")
    env.pop("XDG_CACHE_HOME", None)
    run = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True,
                         timeout=300, cwd=cwd)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"first call of backend='cpu' in a new process: {out['first_call_s'] * 1e3:.1f} ms")
    written = [str(p) for p in list(home.rglob("*")) + list(cwd.rglob("*"))]
    assert written == [], f"the first call wrote {written}"


def test_main_reports_versions_variants_and_backends(tmp_path):
    run = subprocess.run([sys.executable, "-m", "rkkd_kernels"], env=tool_env(), capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert text.startswith(f"rkkd_kernels {rkkd_kernels.__version__} ")
    assert f"torch {torch.__version__} " in text
    info = _ext.build_info()
    assert f"built against torch {info['torch_built_against']}, target torch >= 2.10" in text
    assert f"in use: {_ext.cpu_variants()[0]}" in text
    assert f"variants compiled in: {', '.join(_ext.cpu_variants_compiled())}" in text
    assert ("CUDA kernel: architectures " + str(info["cuda_arch_list"]) if info["cuda_arch_list"]
            else f"CUDA kernel: not in this installation ({info['cuda_missing']})") in text
    report = {line.split()[0]: line.split(None, 1)[1] for line in text.split("backends:\n")[1].splitlines()}
    assert set(report) == set(backends.BACKENDS) - {"auto"}
    assert report["cpu"] == "available" and report["reference"] == "available"
    if not torch.cuda.is_available():
        assert report["cuda"] == f"unavailable: {backends.NO_GPU}"


def test_backend_cpu_without_its_library_raises_the_reason(monkeypatch):
    monkeypatch.setattr(_ext.CPU, "problem", "the CPU kernel is not built (test)")
    s = torch.randn(3, 7)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available: the CPU kernel is not built \(test\)"):
        kendall_loss(s, s, backend="cpu")
    assert rkkd_kernels.available_backends()["cpu"] == "the CPU kernel is not built (test)"


IMPORT_ONLY = r"""
import json, sys, time
start = time.perf_counter()
import rkkd_kernels
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "loaded": [m for m in ("triton", "torch._inductor") if m in sys.modules],
}))
"""


def test_import_loads_neither_triton_nor_inductor_where_triton_cannot_run(tmp_path):
    """On a machine where the Triton kernels cannot run (no CUDA device, no TRITON_INTERPRET),
    `import rkkd_kernels` imports neither Triton nor torch._inductor (about a second)."""
    env = tool_env()
    env.update(CUDA_VISIBLE_DEVICES="")
    script = "import torch\n" + IMPORT_ONLY
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"import rkkd_kernels after torch: {out['seconds'] * 1e3:.0f} ms")
    assert out["loaded"] == []
    env["TRITON_INTERPRET"] = "1"  # where they can run (here: interpreted), they load with the package
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "triton" in json.loads(run.stdout.strip().splitlines()[-1])["loaded"]
