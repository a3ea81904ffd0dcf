"""The Triton kernels compile for a real GPU (sm_90) with Triton's own compiler, without a GPU.

The interpreter that runs the Triton tests in CI executes the kernels' Python and never compiles
them; this runs ``python -m benchmarks.triton_aot --quick`` (every dtype and flag variant the op can
launch, at one configuration, and the other configurations on the usual call) and requires that
every kernel compiles and none spills registers to local memory (GPU_CONFIGS were chosen for that).
About 4 min here with a cold Triton cache (~/.triton/cache; the pair kernel holds three row
forms), a few seconds with a warm one.
"""

import csv
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, tool_env

pytest.importorskip("triton")


def _aot_api_missing():
    """Asked in a child process: the tool imports the kernels, which needs TRITON_INTERPRET unset."""
    probe = "from benchmarks.triton_aot import aot_api_missing; print(aot_api_missing() or '')"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, env=tool_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip() or None


def test_every_kernel_variant_compiles_for_sm90_without_spilling(tmp_path):
    missing = _aot_api_missing()
    if missing:
        pytest.skip(missing)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.triton_aot", "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT, env=tool_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "aot.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    pair_rows = [r for r in rows if r["kernel"] == "pairs"]
    # Every input dtype, flag set and configuration the quick preset promises is there and compiled.
    assert {r["dtype"] for r in pair_rows} == {"float16", "bfloat16", "float32", "float64"}
    assert {(r["hard"], r["need_gs"], r["need_gt"], r["fused"]) for r in pair_rows if r["dtype"] == "float64"} \
        == {(h, gs, gt, f) for h in ("False", "True") for gs in ("False", "True") for gt in ("False", "True")
            for f in ("False", "True") if not (h == "True" and gt == "True")}
    assert len({(r["block"], r["num_warps"]) for r in pair_rows}) == 4
    assert any(r["kernel"] == "finalize" for r in rows)
    assert all(r["status"] == "ok" and r["target"] == "sm_90" for r in rows)
    read = [r for r in rows if r["local_bytes"] != ""]
    if not read:
        pytest.fail("cuobjdump (shipped with Triton's NVIDIA backend) was not found: resources unread")
    spilled = [r for r in read if int(r["local_bytes"]) > 0]
    assert not spilled, spilled


EXPSUM_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rkkd_kernels import triton_expsum as te
fn = te._expsum_kernel
types = {"b_ptr": "*fp64", "t_ptr": "*fp64", "first_ptr": "*i8", "last_ptr": "*i8", "m_lo_ptr": "*i32",
         "count_ptr": "*i32", "kind_ptr": "*i32", "tied_ptr": "*fp64", "loss_ptr": "*fp64",
         "g_ptr": "*fp64", "C": "i32", "step": "fp32", "log2e_hi": "fp32", "log2e_lo": "fp32"}
for need in (True, False):
    consts = dict(NEED_GRAD=need, BLOCK_C=64, BLOCK_M=32)
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(n),): v for n, v in consts.items()})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"]
print("ok")
"""


def test_the_exponential_sum_kernel_compiles_for_sm90():
    """The exponential-sum kernel (float64 throughout) with and without its gradient scan: the
    interpreter that tests it never lowers its float64 reductions and scans for a GPU."""
    missing = _aot_api_missing()
    if missing:
        pytest.skip(missing)
    proc = subprocess.run([sys.executable, "-c", EXPSUM_COMPILE], cwd=REPO_ROOT, env=tool_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout[-3000:] + proc.stderr[-3000:]
