"""Knowledge distillation with the Kendall ranking loss: the command line and a run's phases.

    python -m train.distill --train-teacher --epochs 10 --out runs/kd        # shapes1000, CPU/GPU
    python -m train.distill --config my.yaml --rank-weight 0.5               # YAML + overrides
    torchrun --nproc_per_node=8 -m train.distill --data imagenet --data-dir /data/imagenet \\
        --arch resnet18 --teacher-arch resnet50 --teacher-ckpt teacher.pt

Everything a run writes goes under ``--out``: ``config.yaml``, and per phase (``teacher/`` when
``--train-teacher``, ``student/``) ``last.pt`` / ``final.pt`` checkpoints, ``metrics.csv`` and
``curves.png``; ``summary.md`` holds the final table.

The parts: ``config`` (options), ``runtime`` (processes, seeds, timing), ``loop`` (one phase of
training), ``stats`` (an epoch's statistics), ``checkpoint`` (saving, resuming), ``outputs`` (CSV,
plots, tables), ``teacher`` (where the teacher comes from).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from rkkd_kernels import kendall_loss

from .config import Config, ConfigError, parse_config, resolve_batch_size, validate_config
from .data import DataBundle, DataError, build_data
from .evaluation import TAU_METRIC_K, evaluate_teacher
from .loop import Phase, train_phase
from .models import DESIGN_IMAGE_SIZE
from .outputs import SUMMARY_COLUMNS, format_table, write_summary
from .runtime import Runtime, setup_runtime, shutdown_runtime
from .teacher import load_pretrained_teacher, load_teacher

__all__ = ["Config", "ConfigError", "TAU_METRIC_K", "main", "parse_config", "run",
           "validate_config"]


def _probe_rank_backend(cfg: Config, device: torch.device) -> None:
    """Fail before training when the chosen kendall_loss backend cannot run on this device."""
    probe = torch.zeros(2, 3, device=device)
    try:
        kendall_loss(probe, probe, cfg.rank_k, backend=cfg.rank_backend)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--rank-backend {cfg.rank_backend}: {err}") from err


def run(cfg: Config) -> List[Dict[str, Any]]:
    """Run a configuration checked by :func:`parse_config` (or :func:`validate_config`): the teacher
    phase if asked, then the student; returns the phases' summaries."""
    runtime = setup_runtime(cfg)
    try:
        return _run(cfg, runtime)
    finally:
        shutdown_runtime(runtime)


def _run(cfg: Config, runtime: Runtime) -> List[Dict[str, Any]]:
    log = print if runtime.is_main else (lambda *a, **k: None)
    cfg, data = _prepare(cfg, runtime, log)
    summaries: List[Dict[str, Any]] = []
    teacher, teacher_steps = _teacher(cfg, data, runtime, log, summaries)
    student_phase = Phase("student", cfg.arch, cfg.epochs, cfg.lr, cfg.ce_weight, cfg.kd_weight,
                          cfg.rank_weight, seed_offset=2, teacher_steps=teacher_steps)
    summaries.append(train_phase(cfg, student_phase, data, teacher, runtime))
    _print_summary(cfg, summaries, runtime)
    return summaries


def _prepare(cfg: Config, runtime: Runtime, log) -> Tuple[Config, DataBundle]:
    """The run's resolved options and its data; every check that needs them, before training."""
    cfg = resolve_batch_size(cfg, runtime.world_size)
    if cfg.image_size is None:
        cfg = dataclasses.replace(cfg, image_size=224 if cfg.data == "imagenet" else 32)
    if cfg.rank_weight > 0:
        _probe_rank_backend(cfg, runtime.device)
    data = build_data(cfg.data, cfg.data_dir, cfg.image_size, cfg.seed,
                      cfg.shapes_train_per_class, cfg.shapes_val_per_class, cfg.augment)
    if cfg.rank_top_k is not None and cfg.rank_top_k > data.num_classes:
        raise ConfigError(f"--rank-top-k {cfg.rank_top_k} exceeds the {data.num_classes} classes")
    for arch in filter(None, (cfg.arch, cfg.teacher_arch)):
        if DESIGN_IMAGE_SIZE[arch] != cfg.image_size:
            log(f"note: {arch} is designed for {DESIGN_IMAGE_SIZE[arch]} px inputs; "
                f"running at {cfg.image_size} px")
    if runtime.is_main:
        import yaml

        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.yaml"), "w") as handle:
            yaml.safe_dump(dataclasses.asdict(cfg), handle, sort_keys=False)
    return cfg, data


def _teacher(cfg: Config, data: DataBundle, runtime: Runtime, log,
             summaries: List[Dict[str, Any]]) -> Tuple[Optional[nn.Module], Optional[int]]:
    """The teacher (None without one) and, when trained here, its steps (part of the student's
    identity on --resume). A trained teacher's summary goes into ``summaries``, and so does the
    validation check of a given one."""
    teacher: Optional[nn.Module] = None
    teacher_steps: Optional[int] = None
    if cfg.teacher_ckpt is not None or cfg.teacher_weights is not None:
        if cfg.teacher_weights is not None:
            teacher, arch = load_pretrained_teacher(cfg.teacher_arch, cfg.teacher_weights,
                                                    data.num_classes, runtime.device), cfg.teacher_arch
        else:
            teacher, arch = load_teacher(cfg.teacher_ckpt, cfg.teacher_arch, data.num_classes,
                                         runtime.device)
        metrics = evaluate_teacher(cfg, teacher, data, runtime)
        source = cfg.teacher_weights or cfg.teacher_ckpt
        log(f"[teacher] {arch} from {source}: validation top-1 {metrics['val_top1']:.2f} %, "
            f"top-5 {metrics['val_top5']:.2f} %, CE {metrics['val_ce']:.4g}")
        summaries.append({"phase": "teacher (given)", "arch": arch, **metrics})
    elif cfg.train_teacher:
        teacher_phase = Phase("teacher", cfg.teacher_arch or "cifar_resnet20x2", cfg.teacher_epochs,
                              cfg.teacher_lr or cfg.lr, 1.0, 0.0, 0.0, seed_offset=1)
        summary = train_phase(cfg, teacher_phase, data, None, runtime)
        summaries.append(summary)
        if not summary["complete"]:
            log("[teacher] stopped by --max-steps before its end; distilling from it as it is")
        teacher = summary["model"].eval()
        teacher_steps = summary["steps"]
    if teacher is not None:
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
    return teacher, teacher_steps


def _print_summary(cfg: Config, summaries: List[Dict[str, Any]], runtime: Runtime) -> None:
    if not runtime.is_main:
        return
    table = format_table(summaries, SUMMARY_COLUMNS)
    print("\n" + table)
    write_summary(cfg.out, table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: configuration errors exit with status 2 and one clear line."""
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
