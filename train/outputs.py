"""What a run writes besides checkpoints: metrics.csv, the curves, the summary table.

The demo takes its table, CSV and plot helpers from here as well.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Sequence

from benchmarks import tables

# Columns of metrics.csv, in order. Loss terms are unweighted means over the epoch's batches.
CSV_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_ce", "train_kd", "train_rank", "train_top1",
    "val_ce", "val_top1", "val_top5", "val_tau", "images_per_s", "rank_time_share", "epoch_s",
]

SUMMARY_COLUMNS = ["phase", "arch", "epochs", "steps", "val_top1", "best_val_top1", "val_top5",
                   "val_tau", "images_per_s", "rank_time_share", "wall_s"]


def write_csv(history: List[Dict[str, Any]], path: str) -> None:
    """metrics.csv: one row per epoch; NaN (a term with weight 0, no teacher) as an empty cell."""
    tables.write_csv(path, history, CSV_COLUMNS)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: List[Dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (dicts), NaN shown as '-'."""
    cells = [[_format_value(row.get(c, "")) for c in columns] for row in rows]
    return tables.markdown_table(list(columns), cells)


def write_summary(out_dir: str, table: str, footer: str = "") -> str:
    """OUT/summary.md: the final table (and a line below it); returns its path."""
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as handle:
        handle.write(table + "\n" + (f"\n{footer}\n" if footer else ""))
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: List[Dict[str, Any]], path: str, title: str) -> None:
    """curves.png: training loss terms, validation accuracy, Kendall tau, throughput."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for key in ("train_loss", "train_ce", "train_kd", "train_rank"):
        values = [row[key] for row in history]
        if not all(math.isnan(v) for v in values):
            axes[0, 0].plot(epochs, values, marker="o", label=key)
    axes[0, 0].set_title("training loss terms (unweighted)")
    for key in ("val_top1", "val_top5", "train_top1"):
        axes[0, 1].plot(epochs, [row[key] for row in history], marker="o", label=key)
    axes[0, 1].set_title("accuracy (%)")
    axes[1, 0].plot(epochs, [row["val_tau"] for row in history], marker="o", label="val_tau")
    axes[1, 0].set_title("validation Kendall tau, student vs teacher")
    axes[1, 1].plot(epochs, [row["images_per_s"] for row in history], marker="o",
                    label="images/s")
    axes[1, 1].set_title("training throughput (images/s)")
    _finish(plt, figure, axes.flat, path, title)


def _finish(plt, figure, axes, path: str, title: str) -> None:
    for axis in axes:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def plot_seeds(runs: List[Dict[str, Any]], teacher_top1: float, path: str) -> None:
    """Validation top-1 and Kendall tau per epoch: one curve per (arm, seed), a colour per arm."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    arms = sorted({run["arm"] for run in runs})
    colours = {arm: f"C{i}" for i, arm in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    seeds = sorted({run["seed"] for run in runs})
    # A legend line per seed while the line styles tell the seeds apart; beyond that, one per arm
    # (a legend of 20 lines would cover the curves).
    per_seed = len(seeds) <= len(styles)
    for run in runs:
        epochs = [row["epoch"] for row in run["history"]]
        if per_seed:
            label = f"{run['loss']}, seed {run['seed']}"
        else:
            label = f"{run['loss']}, seeds {seeds[0]}-{seeds[-1]}" if run["seed"] == seeds[0] else None
        style = dict(color=colours[run["arm"]], linestyle=styles[run["seed"] % len(styles)],
                     marker="o", markersize=3, label=label)
        left.plot(epochs, [row["val_top1"] for row in run["history"]], **style)
        right.plot(epochs, [row["val_tau"] for row in run["history"]], **style)
    if not math.isnan(teacher_top1):
        left.axhline(teacher_top1, color="grey", linestyle="--", label="teacher")
    left.set_title("shapes1000 validation top-1 (%)")
    right.set_title("validation Kendall tau (student vs teacher)")
    _finish(plt, figure, (left, right), path, "")
