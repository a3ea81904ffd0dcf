"""Compile the Triton kernels for real GPUs without one: compile errors, registers, spills.

    python -m benchmarks.triton_aot                 # every variant x configuration, sm_80 and sm_90
    python -m benchmarks.triton_aot --quick         # one configuration per variant, sm_90 (the test)

The interpreter that runs the Triton backend in CI executes the kernels' Python with numpy; it never
runs Triton's compiler. A kernel it runs may still fail to compile for a GPU (types, layouts, the
inline PTX) or compile into code that spills registers to local memory. This compiles every variant
the op can launch (input dtype x hard teacher x gradients asked for x one or several programs per
row) with Triton's own compiler, ptxas included, for the given targets, and reads each kernel's
resources with the cuobjdump that Triton ships. Writes aot.csv (one row per compiled kernel) into
--out (default benchmarks/results/) and prints a summary; exits 1 if any variant fails to compile.

Needs Triton's ahead-of-time API (triton.compile of an ASTSource with a GPUTarget, Triton >= 3.3)
and must run without TRITON_INTERPRET (the interpreter replaces the kernels' compiled form). The
kernels' compiled forms come from the package's public ``rkkd_kernels.triton_tools``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("benchmarks.triton_aot compiles for GPUs: run it without TRITON_INTERPRET=1")

import inspect  # noqa: E402

import triton  # noqa: E402
from tqdm import tqdm  # noqa: E402

from rkkd_kernels import triton_tools  # noqa: E402
from rkkd_kernels.triton_tools import KernelVariant, flag_sets  # noqa: E402

from .worker import REPO_ROOT  # noqa: E402

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results")

@dataclass
class Row(KernelVariant):
    target: str = ""
    status: str = ""
    regs: Optional[int] = None
    local_bytes: Optional[int] = None  # spilled registers (local memory per thread)
    stack_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None
    compile_s: float = 0.0
    error: str = ""


def variants(quick: bool) -> List[KernelVariant]:
    """Every pair-kernel variant (quick: at one configuration) and the finalize kernel's."""
    configs = triton_tools.GPU_CONFIGS
    main = (64, 8)
    # quick: the half types differ from float32 only in their loads; they get the usual call alone.
    dtypes = ["float32", "float64"] if quick else list(triton_tools.INPUT_TYPES)
    out = []
    for dtype, (hard, need_gs, need_gt), fused in itertools.product(dtypes, flag_sets(), (True, False)):
        for block, warps in [main] if quick else configs:
            out.append(KernelVariant("pairs", dtype, hard, need_gs, need_gt, fused, block, warps))
    if quick:  # the usual call (soft teacher, student gradient, fused) in the half types, and at
        # the other configurations in float32
        for dtype in ("float16", "bfloat16"):
            out.append(KernelVariant("pairs", dtype, False, True, False, True, *main))
        for block, warps in configs:
            if (block, warps) != main:
                out.append(KernelVariant("pairs", "float32", False, True, False, True, block, warps))
    # The specializations the runtime adds per call, on every flag set at the main configuration
    # (quick: on the usual call): 64-bit integers, and 16-divisible pointers and integers (C = 1000
    # or 1024, aligned tensors: Triton then widens the loads), alone and together.
    special_dtypes = ["float32"] if quick else ["float32", "float64"]
    special_flags = [(False, True, False)] if quick else list(flag_sets())
    for dtype, (hard, need_gs, need_gt), fused, (int_type, aligned) in itertools.product(
            special_dtypes, special_flags, (True, False), (("i64", False), ("i32", True), ("i64", True))):
        out.append(KernelVariant("pairs", dtype, hard, need_gs, need_gt, fused, *main,
                                 int_type=int_type, aligned=aligned))
    # The finalize kernel for every SPLITS_POW2 that num_splits can give (2 .. MAX_SPLITS), every
    # gradient set (none: an evaluation's loss alone) and the same specializations.
    splits_pow2 = [2**e for e in range(1, triton_tools.MAX_SPLITS.bit_length())]
    grads = ((True, True), (True, False), (False, True), (False, False))
    for acc, (need_gs, need_gt), pow2 in itertools.product(("float32", "float64"), grads, splits_pow2):
        out.append(KernelVariant("finalize", acc, False, need_gs, need_gt, False, triton_tools.FINALIZE_BLOCK,
                                 triton_tools.FINALIZE_WARPS, splits_pow2=pow2))
    for acc, (int_type, aligned) in itertools.product(("float32", "float64"), (("i64", False), ("i32", True))):
        out.append(KernelVariant("finalize", acc, False, True, False, False, triton_tools.FINALIZE_BLOCK,
                                 triton_tools.FINALIZE_WARPS, int_type=int_type, aligned=aligned,
                                 splits_pow2=4))
    return out


def aot_api_missing() -> Optional[str]:
    """None when this Triton compiles ahead of time the way this tool asks (Triton >= 3.3)."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as err:
        return f"triton {triton.__version__} has no ahead-of-time compiler API ({err})"
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        return f"triton {triton.__version__} has an older ahead-of-time API; this tool needs Triton >= 3.3"
    return None


def _cuobjdump() -> Optional[str]:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else shutil.which("cuobjdump")


RESOURCE_LINE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def compile_variant(variant: KernelVariant, arch: int, cuobjdump: Optional[str]) -> Row:
    """Compile one variant for sm_<arch>; the row says how it went and what it uses."""
    from triton.backends.compiler import GPUTarget

    row = Row(**asdict(variant), target=f"sm_{arch}")
    start = time.perf_counter()
    try:
        compiled = triton.compile(variant.source(), target=GPUTarget("cuda", arch, 32),
                                  options=variant.options())
    except Exception as err:  # the compiler raises many types; each is a failed variant
        row.status = "compile_error"
        row.error = " ".join(str(err).split())[:300]
        return row
    finally:
        row.compile_s = round(time.perf_counter() - start, 2)
    row.status = "ok"
    if cuobjdump:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                                   capture_output=True, text=True).stdout
        match = RESOURCE_LINE.search(usage)
        if match:
            row.regs, row.stack_bytes, row.shared_bytes, row.local_bytes = map(int, match.groups())
    return row


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one configuration per variant, sm_90")
    parser.add_argument("--arch", type=int, nargs="+", help="compute capabilities (default 80 90; quick: 90)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="folder for aot.csv")
    args = parser.parse_args(argv)
    missing = aot_api_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    archs = args.arch or ([90] if args.quick else [80, 90])
    cuobjdump = _cuobjdump()
    jobs = [(v, arch) for arch in archs for v in variants(args.quick)]
    rows = [compile_variant(v, arch, cuobjdump)
            for v, arch in tqdm(jobs, desc=f"compiling for {archs}", unit="kernel")]

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "aot.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)

    failed = [r for r in rows if r.status != "ok"]
    spilled = [r for r in rows if r.local_bytes]
    print(f"triton {triton.__version__}: {len(rows) - len(failed)} of {len(rows)} kernels compiled "
          f"for {', '.join(f'sm_{a}' for a in archs)}; {len(spilled)} spill registers; "
          f"{'no cuobjdump: resources unread; ' if not cuobjdump else ''}table in {path}")
    for r in failed:
        print(f"  FAILED {r.kernel} {r.dtype} hard={r.hard} gs={r.need_gs} gt={r.need_gt} "
              f"fused={r.fused} {r.block}:{r.num_warps} {r.int_type} aligned={r.aligned} "
              f"splits_pow2={r.splits_pow2} {r.target}: {r.error}")
    for r in spilled:
        print(f"  spills {r.local_bytes} B/thread: {r.kernel} {r.dtype} hard={r.hard} gs={r.need_gs} "
              f"gt={r.need_gt} fused={r.fused} {r.block}:{r.num_warps} {r.target} ({r.regs} registers)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
