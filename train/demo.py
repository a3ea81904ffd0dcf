"""The demo: on shapes1000, train a small teacher, then distil three students from it.

    python -m train.demo --out runs/demo

Students (same architecture, data, seed and schedule; only the loss differs):
    ce           CE only (the teacher is used only to measure the validation Kendall tau)
    ce_kd        CE + T^2 KL
    ce_kd_rank   CE + T^2 KL + Kendall ranking loss

Prints a comparison table (also ``OUT/summary.md``) and writes ``OUT/comparison.png`` next to each
run's own ``metrics.csv`` and ``curves.png``. Sized to finish in well under 15 minutes on a 2-core
CPU with one torch thread (more threads were much slower on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import Config
from .data import build_data
from .loop import Phase, train_phase
from .outputs import format_table, plot_comparison, write_summary
from .runtime import setup_runtime

# (name, description, ce_weight, kd_weight, rank_weight)
STUDENTS = [
    ("ce", "CE only", 1.0, 0.0, 0.0),
    ("ce_kd", "CE + KD", 1.0, 1.0, 0.0),
    ("ce_kd_rank", "CE + KD + Kendall", 1.0, 1.0, 1.0),
]

COLUMNS = ["network", "loss", "val_top1", "best_val_top1", "val_top5", "val_tau", "images_per_s",
           "rank_time_share", "wall_s"]


def build_parser() -> argparse.ArgumentParser:
    """The demo's few options; everything else is fixed so that runs compare."""
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--teacher-arch", default="cifar_resnet14")
    parser.add_argument("--student-arch", default="cifar_resnet8")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--val-per-class", type=int, default=5)
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each student")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rank-weight", type=float, default=1.0)
    parser.add_argument("--rank-k", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="cut every phase short (tests)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
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
    teacher = teacher_summary["model"].eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    rows = [{**teacher_summary, "network": f"teacher {args.teacher_arch}", "loss": "CE"}]

    histories: Dict[str, List[Dict[str, Any]]] = {}
    for name, description, ce_weight, kd_weight, rank_weight in STUDENTS:
        rank_weight = args.rank_weight if rank_weight > 0 else 0.0
        cfg = dataclasses.replace(base, ce_weight=ce_weight, kd_weight=kd_weight,
                                  rank_weight=rank_weight)
        # The same seed_offset for every student: identical initialisation, data order, augmentation.
        phase = Phase(f"student_{name}", args.student_arch, args.epochs, base.lr, ce_weight,
                      kd_weight, rank_weight, seed_offset=2, teacher_steps=teacher_summary["steps"])
        summary = train_phase(cfg, phase, data, teacher, runtime)
        histories[description] = summary.pop("history")
        rows.append({**summary, "network": f"student {args.student_arch}", "loss": description})

    table = format_table(rows, COLUMNS)
    wall = time.perf_counter() - start
    print("\n" + table + f"\n\ntotal wall time {wall:.0f} s")
    write_summary(args.out, table, f"total wall time {wall:.0f} s")
    plot_comparison(histories, teacher_summary["val_top1"], os.path.join(args.out, "comparison.png"))
    print(f"wrote {os.path.join(args.out, 'summary.md')} and "
          f"{os.path.join(args.out, 'comparison.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
