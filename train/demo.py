"""The demo: on shapes1000, train one teacher, then distil students with and without the Kendall term,
on several seeds.

    python -m train.demo --out runs/demo             # 3 seeds
    python -m train.demo --out runs/study --seeds 10  # a longer study

Arms (the same student architecture, data, schedule; only the loss differs):
    kd        CE + T^2 KL
    kd_rank   CE + T^2 KL + Kendall ranking loss

Seed ``s`` fixes a student's initialisation, data order and augmentation, the same in both arms;
the data set and the teacher (from ``--seed``) are shared by every seed. Prints the per-seed table,
the mean +- standard deviation of each arm and the paired difference kd_rank - kd with a 95 %
t-interval (also ``OUT/summary.md``), and writes ``OUT/results.csv`` and ``OUT/comparison.png``
(each seed's curves) beside each run's own ``metrics.csv`` and ``curves.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from benchmarks.tables import write_csv

from .config import Config
from .data import DataBundle, SeededTransform, build_data
from .loop import Phase, train_phase
from .outputs import format_table, plot_seeds, write_summary
from .runtime import Runtime, setup_runtime
from .study import mean_std, paired_difference

# name -> (description, ce_weight, kd_weight, uses the rank term)
ARMS = {"kd": ("CE + KD", 1.0, 1.0, False), "kd_rank": ("CE + KD + Kendall", 1.0, 1.0, True)}

RESULT_COLUMNS = ["seed", "arm", "loss", "val_top1", "best_val_top1", "val_top5", "val_tau",
                  "images_per_s", "rank_time_share", "wall_s"]
METRICS = ("val_top1", "val_tau")


def build_parser() -> argparse.ArgumentParser:
    """The demo's few options; everything else is fixed so that runs compare."""
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--teacher-arch", default="cifar_resnet14")
    parser.add_argument("--student-arch", default="cifar_resnet8")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=10)
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each student")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rank-weight", type=float, default=1.0)
    parser.add_argument("--rank-k", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and the teacher")
    parser.add_argument("--seeds", type=int, default=3,
                        help="student seeds 0..N-1, each run in every arm (default 3)")
    parser.add_argument("--arms", default="kd,kd_rank",
                        help=f"comma-separated arms to run, of {sorted(ARMS)} (default both)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="cut every phase short (tests)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.arms = [arm.strip() for arm in args.arms.split(",") if arm.strip()]
    unknown = [arm for arm in args.arms if arm not in ARMS]
    if unknown or not args.arms:
        parser.error(f"--arms: unknown {unknown}; choose from {sorted(ARMS)}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


def _student_runs(args: argparse.Namespace, base: Config, data: DataBundle, teacher: nn.Module,
                  teacher_steps: int, runtime: Runtime) -> List[Dict[str, Any]]:
    """Every (seed, arm) student; returns one summary per run, with its history."""
    runs = []
    for seed in range(args.seeds):
        # Seed s: the student's initialisation, data order and augmentation, the same in each arm.
        seed_data = dataclasses.replace(
            data, train=SeededTransform(data.train.base, data.train.transform, seed))
        for arm in args.arms:
            description, ce_weight, kd_weight, ranked = ARMS[arm]
            rank_weight = args.rank_weight if ranked else 0.0
            cfg = dataclasses.replace(base, seed=seed, out=os.path.join(args.out, f"seed{seed}"),
                                      ce_weight=ce_weight, kd_weight=kd_weight,
                                      rank_weight=rank_weight)
            phase = Phase(arm, args.student_arch, args.epochs, base.lr, ce_weight, kd_weight,
                          rank_weight, seed_offset=2, teacher_steps=teacher_steps)
            summary = train_phase(cfg, phase, seed_data, teacher, runtime)
            summary.pop("model")
            runs.append({**summary, "seed": seed, "arm": arm, "loss": description})
    return runs


def _statistics(runs: List[Dict[str, Any]], arms: List[str]) -> str:
    """The per-arm mean +- std and, with both arms, the paired difference kd_rank - kd (t-interval)."""
    lines = []
    for arm in arms:
        for metric in METRICS:
            stats = mean_std([r[metric] for r in runs if r["arm"] == arm])
            lines.append(f"{arm:8s} {metric}: {stats['mean']:.4g} +- {stats['std']:.3g} "
                         f"(mean +- sd over {stats['n']} seeds)")
    if set(ARMS) <= set(arms):
        for metric in METRICS:
            by_arm = {arm: [r[metric] for r in sorted(runs, key=lambda r: r["seed"])
                            if r["arm"] == arm] for arm in ARMS}
            diff = paired_difference(by_arm["kd_rank"], by_arm["kd"])
            lines.append(f"kd_rank - kd, {metric}: {diff['mean']:+.4g} (sd {diff['std']:.3g}); "
                         f"95% t-interval [{diff['low']:+.4g}, {diff['high']:+.4g}] "
                         f"(t = {diff['t']:.3f}, {diff['n'] - 1} dof)")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status."""
    args = _parse(argv)
    start, load_start = time.perf_counter(), os.getloadavg()
    base = Config(
        data="shapes1000", image_size=args.image_size,
        shapes_train_per_class=args.train_per_class, shapes_val_per_class=args.val_per_class,
        arch=args.student_arch, teacher_arch=args.teacher_arch, train_teacher=True,
        teacher_epochs=args.teacher_epochs, epochs=args.epochs, batch_size=args.batch_size,
        temperature=args.temperature, rank_k=args.rank_k, seed=args.seed, out=args.out,
        resume=args.resume, threads=args.threads, progress=args.progress, max_steps=args.max_steps,
        device="cpu", workers=0,
    )
    runtime = setup_runtime(base)
    data = build_data("shapes1000", None, args.image_size, args.seed, args.train_per_class,
                      args.val_per_class)
    print(f"shapes1000: {len(data.train)} training and {len(data.val)} validation images of "
          f"{args.image_size} px, {data.num_classes} classes; {torch.get_num_threads()} thread(s)")

    teacher_phase = Phase("teacher", args.teacher_arch, args.teacher_epochs, base.lr, 1.0, 0.0, 0.0,
                          seed_offset=1)
    teacher_summary = train_phase(base, teacher_phase, data, None, runtime)
    teacher = teacher_summary.pop("model").eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    runs = _student_runs(args, base, data, teacher, teacher_summary["steps"], runtime)

    teacher_row = {**teacher_summary, "seed": args.seed, "arm": "teacher",
                   "loss": f"CE ({args.teacher_arch})"}
    table = format_table([teacher_row] + runs, RESULT_COLUMNS)
    statistics = _statistics(runs, args.arms)
    wall, load_end = time.perf_counter() - start, os.getloadavg()
    footer = (f"{statistics}\n\ntotal wall time {wall:.0f} s; load average (1, 5, 15 min) "
              f"{' '.join(f'{x:.2f}' for x in load_start)} at the start, "
              f"{' '.join(f'{x:.2f}' for x in load_end)} at the end, on {os.cpu_count()} cores")
    print("\n" + table + "\n\n" + footer)
    summary_path = write_summary(args.out, table, footer)
    write_csv(os.path.join(args.out, "results.csv"), [teacher_row] + runs, RESULT_COLUMNS)
    plot_seeds(runs, teacher_summary["val_top1"], os.path.join(args.out, "comparison.png"))
    print(f"wrote {summary_path}, {os.path.join(args.out, 'results.csv')} and "
          f"{os.path.join(args.out, 'comparison.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
