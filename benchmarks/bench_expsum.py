"""Benchmark the hard-teacher loss by exponential sums against the pair kernel (CPU).

    python -m benchmarks.bench_expsum                  # the cells below, ~6 min on 2 loaded cores
    python -m benchmarks.bench_expsum --quick          # a smoke run (small cells)

Every cell: hard teacher, float32, forward + backward through ``kendall_loss``, k = 1, standard
normal logits, ``--threads`` intra-op threads (default 2). The two methods of one cell are timed
in the same process, interleaved (expsum, pairs, expsum, pairs, ...), and the best of the
repetitions is kept; the ratio of one cell is what to read, not the absolute times of a shared
machine (the load average before and after is written beside them). A pair-kernel cell whose first
call exceeds --cap-s is not repeated, and one whose estimate (from the previous, smaller C)
exceeds it is skipped.

Writes into --out (default benchmarks/results/expsum/): expsum.csv, expsum.md and
expsum_time_vs_C.png (time against C on log axes, both methods: the crossover shows).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import time
from typing import Dict, List, Optional

import torch

from rkkd_kernels import expsum, kendall_loss

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results", "expsum")

# (name, B, C, methods): the headline cells first, then the sweep for the plot.
CELLS = [
    ("ratio", 64, 32000, ("expsum", "pairs")),
    ("auto-1000", 256, 1000, ("auto", "pairs")),
] + [("sweep", max(8, 2**17 // c), c, ("expsum", "pairs")) for c in (32, 100, 300, 1000, 3000, 10000)] + [
    ("vocab", 8, c, ("expsum", "pairs")) for c in (21841, 32000, 128000)
]

QUICK_CELLS = [("ratio", 4, 4000, ("expsum", "pairs")), ("auto-1000", 16, 1000, ("auto", "pairs"))]


def isa() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def one_call(s: torch.Tensor, t: torch.Tensor, method: str) -> float:
    x = s.clone().requires_grad_(True)
    start = time.perf_counter()
    kendall_loss(x, t, 1.0, hard_teacher=True, method=method).backward()
    return time.perf_counter() - start


def time_cell(b: int, c: int, methods, reps: int, cap_s: float, estimate: Dict[str, float]):
    gen = torch.Generator().manual_seed(c)
    s = torch.randn((b, c), generator=gen)
    t = torch.randn((b, c), generator=gen)
    spread = float((s.amax(-1) - s.amin(-1)).max())  # k = 1: the largest k * R of the batch
    best: Dict[str, Optional[float]] = {m: None for m in methods}
    for rep in range(reps):
        for m in methods:
            if estimate.get(m, 0.0) > cap_s:
                continue  # skipped: its estimate already exceeds the cap
            if rep > 0 and best[m] is not None and best[m] > cap_s:
                continue  # slow: one call is all it gets
            dt = one_call(s, t, m)
            best[m] = dt if best[m] is None else min(best[m], dt)
    return best, spread


def run(cells, reps: int, cap_s: float, out: str, threads: int) -> List[dict]:
    torch.set_num_threads(threads)
    rows: List[dict] = []
    last: Dict[tuple, tuple] = {}  # (name, method) -> (C, B, time) of the previous cell
    for name, b, c, methods in cells:
        estimate = {}
        for m in methods:
            prev = last.get(("pairs" if m == "pairs" else "fast", b))
            if m == "pairs" and prev is not None:
                estimate[m] = prev[1] * (c / prev[0]) ** 2  # the pair kernel is O(C^2)
        before = load_average()
        best, spread = time_cell(b, c, methods, reps, cap_s, estimate)
        for m, dt in best.items():
            if dt is not None:
                last[("pairs" if m == "pairs" else "fast", b)] = (c, dt)
        chosen = expsum.choose("auto", "cpu", c, 1.0, torch.float32, True)
        row = {
            "cell": name, "B": b, "C": c,
            "max_kR": round(spread, 2), "nodes": expsum.LATTICES[torch.float32].nodes(spread),
            "auto_picks": chosen,
            **{f"{m}_ms": (None if best[m] is None else round(best[m] * 1e3, 2)) for m in methods},
            "load_before": before, "load_after": load_average(),
        }
        fast = best.get("expsum") or best.get("auto")
        if best.get("pairs") and fast:
            row["pairs_over_fast"] = round(best["pairs"] / fast, 2)
        rows.append(row)
        print(row, flush=True)
    os.makedirs(out, exist_ok=True)
    write(rows, out, threads)
    return rows


def write(rows: List[dict], out: str, threads: int) -> None:
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with open(os.path.join(out, "expsum.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    header = (f"CPU ({isa()}), {threads} threads, torch {torch.__version__}, float32, hard teacher, "
              "fwd+bwd, k=1, standard-normal logits; best of the interleaved repetitions\n\n")
    cols = ["cell", "B", "C", "max_kR", "nodes", "auto_picks", "expsum_ms", "auto_ms", "pairs_ms", "pairs_over_fast",
            "load_before", "load_after"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in cols) + " |")
    with open(os.path.join(out, "expsum.md"), "w") as f:
        f.write(header + "\n".join(lines) + "\n")
    plot(rows, os.path.join(out, "expsum_time_vs_C.png"), threads)


def plot(rows: List[dict], path: str, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [r for r in rows if r["cell"] in ("sweep", "vocab")]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, style in (("expsum", "o-"), ("pairs", "s--")):
        pts = sorted((r["C"], r[f"{method}_ms"] / r["B"]) for r in swept if r.get(f"{method}_ms"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("C (classes per row)")
    ax.set_ylabel("ms per row (fwd+bwd; B = max(8, 2^17 / C))")
    ax.set_title(f"hard teacher, float32, CPU {isa()}, {threads} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cap-s", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args()
    run(QUICK_CELLS if args.quick else CELLS, args.reps, args.cap_s, args.out, args.threads)


if __name__ == "__main__":
    main()
