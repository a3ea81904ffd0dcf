"""What the benchmark writes: speed-ups, the CSV files, the printed and markdown tables, the plots."""

from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

from . import tables
from .measure import MODES, REFERENCE_PROVIDERS

Row = Dict[str, Any]

COLUMNS = [
    "backend",  # the provider: reference (eager), reference_compiled, cpu, triton, cuda
    "device",
    "mode",
    "B",
    "C",
    "dtype",
    "top_k",
    "pairs",  # B * n (n - 1) / 2 with n = top_k or C
    "median_ms",
    "iqr_ms",
    "min_ms",  # the fastest sample: the least disturbed by other work on a shared machine
    "samples",
    "peak_mem_mb",  # peak extra memory of one call, MB = 2**20 bytes
    "pairs_per_s",
    "speedup_vs_eager",
    "speedup_vs_compile",
    "compile_s",  # reference_compiled: compile time of the forward and backward graphs, cold cache
    "cxc_matrices",  # peak_mem_mb in units of one B x n x n matrix (accumulation dtype)
    "est_mem_gb",  # reference providers: the estimate the skip decision used
    "loss_value",
    "status",  # ok, skipped: <why>, error: <what>
]

E2E_COLUMNS = [
    "backend",
    "device",
    "batch",
    "image_px",
    "step_ms",
    "step_iqr_ms",
    "step_min_ms",
    "step_ce_only_ms",
    "kendall_ms",
    "kendall_iqr_ms",
    "kendall_share",
    "step_peak_mem_mb",
    "step_speedup_vs_reference",
    "status",
]

LABELS = {"reference": "eager", "reference_compiled": "compiled"}
STYLES = {
    "reference": dict(color="tab:red", marker="o"),
    "reference_compiled": dict(color="tab:orange", marker="s"),
    "cpu": dict(color="tab:blue", marker="^"),
    "triton": dict(color="tab:green", marker="v"),
    "cuda": dict(color="tab:purple", marker="D"),
}


def label(provider: str) -> str:
    return LABELS.get(provider, provider)


def _ok(row: Optional[Row]) -> bool:
    return row is not None and row["status"] == "ok" and _finite(row.get("median_ms"))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def cell_key(row: Row) -> Tuple:
    return (row["mode"], row["B"], row["C"], row["dtype"], row["top_k"])


def add_speedups(rows: List[Row]) -> None:
    """speedup_vs_eager / _vs_compile = the reference's median / this row's median, same cell."""
    by_provider = {(row["backend"],) + cell_key(row): row for row in rows}
    for row in rows:
        for column, reference in (
            ("speedup_vs_eager", "reference"),
            ("speedup_vs_compile", "reference_compiled"),
        ):
            base = by_provider.get((reference,) + cell_key(row))
            row[column] = base["median_ms"] / row["median_ms"] if _ok(base) and _ok(row) else None


# The CSV files: the same writer as the harness's (None and non-finite cells empty).
write_csv = tables.write_csv


# ------------------------------------------------------------------------------------------ tables
def _num(x: Any, digits: int = 3) -> str:
    if not _finite(x):
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _cell_text(row: Optional[Row], column: str) -> str:
    if row is None:
        return ""
    if row["status"].startswith("skipped"):
        return "skip"
    if row["status"] != "ok":
        return "error"
    return _num(row.get(column))


def providers_in(rows: Iterable[Row]) -> List[str]:
    order = ["reference", "reference_compiled", "cpu", "triton", "cuda"]
    present = {row["backend"] for row in rows}
    return [p for p in order if p in present] + sorted(present - set(order))


def shapes_in(rows: Iterable[Row]) -> List[Tuple]:
    shapes = {(row["B"], row["C"], row["top_k"], row["dtype"]) for row in rows}
    return sorted(shapes, key=lambda s: (s[3], s[1], s[2] or 0, s[0]))


def mode_table(rows: List[Row], mode: str, markdown: bool = False) -> str:
    """One line per shape: the time of every provider, each fast backend's speed-ups, the memory."""
    rows = [row for row in rows if row["mode"] == mode]
    providers = providers_in(rows)
    fast = [p for p in providers if p not in REFERENCE_PROVIDERS]
    header = ["B", "C", "top_k", "dtype"]
    header += [f"{label(p)} ms" for p in providers]
    header += [f"{f} vs {label(r)} (x)" for f in fast for r in REFERENCE_PROVIDERS if r in providers]
    header += [f"{label(p)} MB" for p in providers]
    if "reference_compiled" in providers:
        header.append("compile s")
    index = {(row["backend"], row["B"], row["C"], row["top_k"], row["dtype"]): row for row in rows}
    lines = []
    for b, c, top_k, dtype in shapes_in(rows):
        get = lambda p: index.get((p, b, c, top_k, dtype))  # noqa: E731
        line = [str(b), str(c), str(top_k or "-"), dtype]
        line += [_cell_text(get(p), "median_ms") for p in providers]
        for f in fast:
            for r in REFERENCE_PROVIDERS:
                if r in providers:
                    column = "speedup_vs_eager" if r == "reference" else "speedup_vs_compile"
                    row = get(f)
                    line.append(_num(row[column]) if row is not None and _finite(row[column]) else "-")
        line += [_cell_text(get(p), "peak_mem_mb") for p in providers]
        if "reference_compiled" in providers:
            line.append(_cell_text(get("reference_compiled"), "compile_s"))
        lines.append(line)
    return _render(header, lines, markdown)


def e2e_table(rows: List[Row], markdown: bool = False) -> str:
    header = ["backend", "device", "batch", "px", "step ms", "step CE only ms", "kendall ms",
              "kendall share", "step peak MB", "step speed-up"]
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append([row["backend"], row["device"], str(row["batch"]), str(row["image_px"])]
                         + [row["status"]] + [""] * 5)
            continue
        share = row["kendall_share"]
        lines.append([
            row["backend"], row["device"], str(row["batch"]), str(row["image_px"]),
            _num(row["step_ms"]), _num(row["step_ce_only_ms"]), _num(row["kendall_ms"]),
            f"{100 * share:.1f}%" if _finite(share) else "-",
            _num(row.get("step_peak_mem_mb")), _num(row.get("step_speedup_vs_reference")),
        ])
    return _render(header, lines, markdown)


def _render(header: List[str], lines: List[List[str]], markdown: bool) -> str:
    if markdown:
        return tables.markdown_table(header, lines, padded=False)
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
              for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- plots
def write_plots(rows: List[Row], out_dir: str, mem_cap_gb: float) -> List[str]:
    """time_vs_C.png, memory_vs_C.png, speedup.png (with a _<dtype> suffix when the run has several
    dtypes); returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({row["dtype"] for row in rows})
    paths: List[str] = []
    for dtype in dtypes:
        suffix = "" if len(dtypes) == 1 else f"_{dtype}"
        paths += _plots_of_one_dtype(plt, [r for r in rows if r["dtype"] == dtype], out_dir,
                                     mem_cap_gb, suffix)
    return paths


def _plots_of_one_dtype(plt, rows: List[Row], out_dir: str, mem_cap_gb: float,
                        suffix: str) -> List[str]:
    paths = []
    full_rows = [row for row in rows if row["top_k"] is None]
    batches = sorted({row["B"] for row in full_rows})
    modes = [m for m in MODES if any(row["mode"] == m for row in full_rows)]
    providers = providers_in(rows)
    dtype = rows[0]["dtype"] if rows else "float32"
    device = rows[0]["device"] if rows else "cpu"

    def series(provider: str, mode: str, batch: int, column: str):
        points = sorted(
            (row["C"], row[column]) for row in full_rows
            if row["backend"] == provider and row["mode"] == mode and row["B"] == batch
            and _ok(row) and _finite(row.get(column))
        )
        return [p[0] for p in points], [p[1] for p in points]

    if full_rows:
        fig, axes = plt.subplots(len(modes), len(batches), squeeze=False, sharex=True,
                                 figsize=(4.2 * len(batches), 3.3 * len(modes)))
        for i, mode in enumerate(modes):
            for j, batch in enumerate(batches):
                ax = axes[i][j]
                for provider in providers:
                    xs, ys = series(provider, mode, batch, "median_ms")
                    if xs:
                        ax.plot(xs, ys, label=label(provider), **STYLES.get(provider, {}))
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.grid(True, which="both", alpha=0.3)
                ax.set_title(f"{mode}, B={batch}")
                if i == len(modes) - 1:
                    ax.set_xlabel("C (classes)")
                if j == 0:
                    ax.set_ylabel("median time (ms)")
        axes[0][0].legend()
        fig.suptitle(f"kendall_loss time vs C ({device}, {dtype}; missing points: skipped, "
                     "reference over the memory cap)")
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out_dir, f"time_vs_C{suffix}.png")))
        plt.close(fig)

        floor_mb = 0.01
        mode = "forward+backward" if "forward+backward" in modes else modes[0]
        fig, axes = plt.subplots(1, len(batches), squeeze=False, figsize=(4.2 * len(batches), 3.5))
        for j, batch in enumerate(batches):
            ax = axes[0][j]
            for provider in providers:
                xs, ys = series(provider, mode, batch, "peak_mem_mb")
                if xs:
                    ax.plot(xs, [max(y, floor_mb) for y in ys], label=label(provider),
                            **STYLES.get(provider, {}))
            ax.axhline(mem_cap_gb * 1e9 / 2**20, color="gray", linestyle="--", label="memory cap")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{mode}, B={batch}")
            ax.set_xlabel("C (classes)")
            if j == 0:
                ax.set_ylabel(f"peak extra memory (MB, floor {floor_mb})")
        axes[0][0].legend()
        fig.suptitle(f"kendall_loss peak extra memory vs C ({device}, {dtype})")
        fig.tight_layout()
        paths.append(_save(fig, os.path.join(out_dir, f"memory_vs_C{suffix}.png")))
        plt.close(fig)

    speedup_path = _speedup_bars(plt, rows, out_dir, suffix)
    if speedup_path:
        paths.append(speedup_path)
    return paths


def _speedup_bars(plt, rows: List[Row], out_dir: str, suffix: str) -> Optional[str]:
    mode = "forward+backward"
    fast = [p for p in providers_in(rows) if p not in REFERENCE_PROVIDERS]
    cells = [s for s in shapes_in([r for r in rows if r["mode"] == mode])]
    bars = []  # (fast provider, "vs eager"/"vs compiled", values per cell)
    for provider in fast:
        for column, name in (("speedup_vs_eager", "eager"), ("speedup_vs_compile", "compiled")):
            values = []
            for b, c, top_k, dtype in cells:
                match = [r for r in rows if r["backend"] == provider and r["mode"] == mode
                         and (r["B"], r["C"], r["top_k"], r["dtype"]) == (b, c, top_k, dtype)]
                values.append(match[0][column] if match and _finite(match[0][column]) else None)
            if any(v is not None for v in values):
                bars.append((provider, name, values))
    if not bars:
        return None
    import numpy as np

    x = np.arange(len(cells))
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(cells) * len(bars)), 4.5))
    for k, (provider, name, values) in enumerate(bars):
        heights = [v if v is not None else np.nan for v in values]
        ax.bar(x + (k - (len(bars) - 1) / 2) * width, heights, width,
               label=f"{provider} vs {name} reference",
               color=STYLES.get(provider, {}).get("color"), alpha=1.0 if name == "eager" else 0.5)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"B={b}\nC={c}" + (f"\ntop_k={k}" if k else "") for b, c, k, _ in cells],
                       fontsize=7)
    ax.set_ylabel("speed-up (x), log scale")
    ax.set_title(f"{mode}, {cells[0][3]}: speed-up of the fused backends (no bar: reference skipped)")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = _save(fig, os.path.join(out_dir, f"speedup{suffix}.png"))
    plt.close(fig)
    return path


def _save(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    return path
