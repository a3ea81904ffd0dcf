"""Golden outputs of the CPU kernels: ``python tests/golden/make_golden.py OUT.pt``.

Runs a fixed set of cases through the raw ops ``rkkd::kendall`` and ``rkkd::kendall_expsum`` with
every CPU variant this build has and this CPU runs, and stores the inputs, the outputs and where
they were made. tests/test_golden.py recomputes them with a later build (the LibTorch stable-ABI
port) and asks for the same bits. ``--add`` adds the variants of this machine to an existing file
(an AVX-512 machine adding x86-64-v4, say); variants already there are never replaced.

The stored outputs come from the build before the stable-ABI library (commit 9772e42, kernels
compiled on first use, a variant forced by RKKD_CPU_ISA): to add a variant of that build, run this
file at that commit (its run_variant and variants_here speak both builds' ways of forcing one).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
import zlib
from typing import Callable, Dict, List, Optional, Tuple

import torch

import rkkd_kernels  # noqa: F401  (defines the ops and registers their CPU kernels)
from rkkd_kernels import _ext
from rkkd_kernels.expsum import lattice

FORMAT = 1
# The variants compared, best first (the old build has v4 and v3; the port adds x86-64).
VARIANTS = ("x86-64-v4", "x86-64-v3", "x86-64")
# CPU features that select code in glibc's libm (ifuncs) or in the kernels.
CPU_FEATURES = ("fma", "avx2", "avx512f")
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "f64": torch.float64}
FLAGS = {"both": (True, True), "student": (True, False), "none": (False, False)}
KS = (1e-3, 1.0, 50.0)


# ------------------------------------------------------------------------------------------------
# The build's variants: the port's API where present, else the old build's.


def variants_here() -> List[str]:
    """The compared variants that this build has and this CPU runs, best first."""
    names = _ext.cpu_variants() if hasattr(_ext, "cpu_variants") else _ext.tested_cpu_isas()
    return [v for v in VARIANTS if v in names]


def run_variant(name: str, fn: Callable):
    """fn() with the CPU kernels of variant ``name``."""
    if hasattr(_ext, "forced_cpu_variant"):
        with _ext.forced_cpu_variant(name):
            return fn()
    saved = os.environ.get("RKKD_CPU_ISA")
    os.environ["RKKD_CPU_ISA"] = name  # the old build reads it at every call
    try:
        return fn()
    finally:
        if saved is None:
            os.environ.pop("RKKD_CPU_ISA", None)
        else:
            os.environ["RKKD_CPU_ISA"] = saved


def _first_line(cmd: List[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0].strip() if out.strip() else "unknown"


def fingerprint() -> Dict[str, object]:
    """What the bits depend on besides the sources: compiler, libm (glibc) and CPU."""
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or "unknown"
    except (ValueError, OSError):
        glibc = "unknown"
    flags: set = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return {
        "compiler": _first_line(shlex.split(os.environ.get("CXX") or "c++") + ["--version"]),
        "glibc": glibc,
        "machine": platform.machine(),
        **{feature: feature in flags for feature in CPU_FEATURES},
    }


def made_with() -> Dict[str, str]:
    """Provenance only (never compared)."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return {"torch": str(torch.__version__), "commit": _first_line(["git", "-C", repo, "rev-parse", "HEAD"]),
            "date": datetime.date.today().isoformat()}


# ------------------------------------------------------------------------------------------------
# Row paths, as labels for the cases (pair_math.h's choose_row_path; expsum.py's max_spread).


def pair_path(s: torch.Tensor, t: torch.Tensor, k: float, hard: bool) -> str:
    s, t, in_float = s.double(), t.double(), s.dtype != torch.float64
    if not (s.isfinite().all() and t.isfinite().all()):
        return "non_finite"
    rs, rt = (s.max() - s.min()).item(), (t.max() - t.min()).item()
    spread = k * (rs if hard or rs >= rt else rt)
    if spread <= 1.0:
        return "float_small" if in_float else "double_small"
    if in_float and spread <= 80.0:
        return "float_ratio"
    return "double_ratio" if spread <= 700.0 else "direct"


def expsum_path(s: torch.Tensor, t: torch.Tensor, k: float) -> str:
    if not (s.isfinite().all() and t.isfinite().all()):
        return "non_finite"
    if k * (s.double().max() - s.double().min()).item() <= lattice(s.dtype).max_spread:
        return "expsum"
    return "pairs_" + pair_path(s, t, k, True)


# ------------------------------------------------------------------------------------------------
# The cases.


def _generator(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))  # stable across runs


def _spread_row(g: torch.Generator, c: int, spread: float) -> torch.Tensor:
    """Random values (float64) spanning exactly ``spread``, off centre."""
    z = torch.randn(c, generator=g, dtype=torch.float64)
    z = (z - z.min()) / (z.max() - z.min())
    offset = spread * (2.0 * torch.rand((), generator=g, dtype=torch.float64).item() - 1.0)
    return offset + spread * (z - 0.5)


def _rows(g, c, k, dtype, spreads, teacher_factors) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, student, teacher) rows in ``dtype``: one per k * spread, then ties, huge values and
    non-finite logits. A row that overflows ``dtype`` (large spread over a tiny k) is left out."""
    rows = []
    for (name, ks), factor in zip(spreads, teacher_factors):
        rows.append((name, _spread_row(g, c, ks / k), _spread_row(g, c, factor * ks / k)))
    ties_s, ties_t = _spread_row(g, c, 5.0 / k), _spread_row(g, c, 4.0 / k)
    rows.append(("ties", (ties_s * k).round() / k, (ties_t * k * 0.5).round() / k))  # few levels
    top = torch.finfo(dtype).max
    sign = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    sign[0], sign[-1] = 1.0, -1.0
    huge = sign * top * (0.5 + 0.4 * torch.rand(c, generator=g, dtype=torch.float64))
    rows.append(("huge", huge, huge.flip(0)))
    out = []
    for name, s, t in rows:
        s, t = s.to(dtype), t.to(dtype)
        if s.isfinite().all() and t.isfinite().all():
            out.append((name, s, t))
    base_s, base_t = _spread_row(g, c, 10.0 / k).to(dtype), _spread_row(g, c, 10.0 / k).to(dtype)
    for name, which, pos, value in (("nan_student", 0, 0, float("nan")),
                                    ("inf_teacher", 1, c - 1, float("inf")),
                                    ("neg_inf_student", 0, c // 2, float("-inf"))):
        s, t = base_s.clone(), base_t.clone()
        (s, t)[which][pos] = value
        out.append((name, s, t))
    return out


PAIR_SPREADS = (("spread_0.5", 0.5), ("spread_10", 10.0), ("spread_200", 200.0), ("spread_2000", 2000.0))
EXPSUM_SPREADS = (("spread_0.5", 0.5), ("spread_10", 10.0), ("spread_60", 60.0), ("spread_200", 200.0),
                  ("spread_500", 500.0), ("spread_2000", 2000.0))


def build_cases() -> Tuple[Dict[str, Dict[str, torch.Tensor]], List[dict]]:
    """(inputs by key, cases): every case names its inputs, op, arguments, group and row paths."""
    inputs: Dict[str, Dict[str, torch.Tensor]] = {}
    cases: List[dict] = []

    def add(key, rows, op, group, k, hard, flags):
        if key not in inputs:
            inputs[key] = {"student": torch.stack([s for _, s, _ in rows]),
                           "teacher": torch.stack([t for _, _, t in rows])}
            inputs[key]["row_names"] = [name for name, _, _ in rows]
        for flag in flags:
            paths = [pair_path(s, t, k, hard) if op == "kendall" else expsum_path(s, t, k)
                     for _, s, t in rows]
            cases.append({"name": f"{key}/{'hard' if hard else 'soft'}/{flag}", "group": group,
                          "op": op, "input": key, "k": k, "hard": hard,
                          "need_grad_student": FLAGS[flag][0], "need_grad_teacher": FLAGS[flag][1],
                          "paths": paths})

    for dname, dtype in DTYPES.items():
        # Small C with every k and flag; C = 1000 (long SIMD loops) with fewer, to keep the file small.
        for c, ks, flags in [(2, KS, FLAGS), (3, KS, FLAGS), (17, KS, FLAGS), (1000, (1.0,), ("both",))]:
            for k in ks:
                key = f"kendall/{dname}/C{c}/k{k:g}"
                rows = _rows(_generator(key), c, k, dtype, PAIR_SPREADS, (1.5, 0.6, 1.5, 0.6))
                add(key, rows, "kendall", f"kendall-{dname}", k, False, flags)
                add(key, rows, "kendall", f"kendall-{dname}", k, True,
                    flags if c < 1000 else ("student",))
        for c, ks, flags in [(2, KS, FLAGS), (3, KS, FLAGS), (17, KS, FLAGS), (1000, (1.0,), ("student",))]:
            for k in ks:
                key = f"expsum/{dname}/C{c}/k{k:g}"
                rows = _rows(_generator(key), c, k, dtype, EXPSUM_SPREADS, (1.0,) * len(EXPSUM_SPREADS))
                t_const = torch.full((c,), 0.25, dtype=dtype)  # one tie group: no untied pair
                rows.append(("teacher_constant", rows[1][1], t_const))
                add(key, rows, "kendall_expsum", f"expsum-{dname}", k, True, flags)

    # C >= 4096: chunked rows. Two rows (each row on one thread, at two threads) and one row (its
    # chunks on several threads).
    c = 4100
    for dname, spreads in (("f32", (("spread_10", 10.0), ("spread_0.5", 0.5))),
                           ("f32", (("spread_20", 20.0),)),
                           ("f64", (("spread_10", 10.0), ("spread_2000", 2000.0))),
                           ("bf16", (("spread_10", 10.0),))):
        key = f"kendall/{dname}/C{c}/rows{len(spreads)}"
        g = _generator(key)
        rows = [(n, _spread_row(g, c, ks).to(DTYPES[dname]), _spread_row(g, c, 0.8 * ks).to(DTYPES[dname]))
                for n, ks in spreads]
        add(key, rows, "kendall", "kendall-chunked", 1.0, False, ("both",))
        add(key, rows, "kendall", "kendall-chunked", 1.0, True, ("student",))
    return inputs, cases


# ------------------------------------------------------------------------------------------------
# Running them.


@contextlib.contextmanager
def two_threads():
    """At two threads both schedules of the chunked rows run (rows >= threads, and fewer), on any
    machine; a row's bits do not depend on the thread count, which the test confirms anyway."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_case(case: dict, inputs: Dict[str, Dict[str, torch.Tensor]]) -> List[torch.Tensor]:
    x = inputs[case["input"]]
    op = getattr(torch.ops.rkkd, case["op"])
    return list(op(x["student"], x["teacher"], case["k"], case["hard"], case["need_grad_student"],
                   case["need_grad_teacher"]))


def compute(variant: str, cases: List[dict], inputs) -> List[List[torch.Tensor]]:
    with two_threads():
        return run_variant(variant, lambda: [run_case(case, inputs) for case in cases])


def load(path: str) -> dict:
    return torch.load(path, weights_only=True)


def _same_inputs(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k][n].view(torch.uint8), b[k][n].view(torch.uint8))
        for k in a for n in ("student", "teacher"))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the .pt file to write")
    parser.add_argument("--add", action="store_true",
                        help="add this machine's variants to OUT (those already in it are kept)")
    args = parser.parse_args(argv)
    inputs, cases = build_cases()
    data = {"format": FORMAT, "inputs": inputs, "cases": cases, "variants": {}}
    if args.add:
        data = load(args.out)
        if not _same_inputs(data["inputs"], inputs) or [c["name"] for c in data["cases"]] != [
                c["name"] for c in cases]:
            sys.exit(f"{args.out} holds other cases than this script makes; regenerate it whole")
    todo = [v for v in variants_here() if v not in data["variants"]]
    if not todo:
        sys.exit(f"no variant to add: this machine runs {variants_here()}")
    for variant in todo:
        data["variants"][variant] = {"fingerprint": fingerprint(), "made_with": made_with(),
                                     "outputs": compute(variant, data["cases"], data["inputs"])}
        print(f"{variant}: {len(cases)} cases", file=sys.stderr)
    torch.save(data, args.out)
    print(f"wrote {args.out}: variants {sorted(data['variants'])}, "
          f"{os.path.getsize(args.out) / 2**20:.2f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
