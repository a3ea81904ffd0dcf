"""One phase of training (the teacher, or the student): the loss, the steps, validation, resuming.

The student's loss is::

    ce_weight * CE(student, label)
    + kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + rank_weight * kendall_loss(student, teacher.detach(), k, top_k=...)
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from rkkd_kernels import kendall_loss

from . import checkpoint, outputs
from .config import RESUME_FREE_OPTIONS, Config, ConfigError
from .data import DataBundle
from .evaluation import evaluate, validation_loader
from .models import build_model
from .runtime import (Runtime, SkipFirst, Stopwatch, autocaster, loader_options,
                      seed_everything)
from .stats import SUM_FIELDS, TERMS, EpochStats, Interval, Progress

STUDENT_ONLY_OPTIONS = ("arch", "epochs", "lr", "ce_weight", "kd_weight", "rank_weight",
                        "temperature", "rank_k", "rank_top_k", "rank_hard_teacher", "rank_backend",
                        "teacher_ckpt", "teacher_weights")


@dataclass
class Phase:
    """What differs between training the teacher and distilling the student."""

    name: str  # "teacher" or "student": also the folder under --out
    arch: str
    epochs: int
    lr: float
    ce_weight: float
    kd_weight: float
    rank_weight: float
    seed_offset: int
    teacher_steps: Optional[int] = None  # steps of the teacher trained in this run, if any

    def result_options(self, cfg: Config) -> Dict[str, Any]:
        """The options that determine this phase's result (compared on --resume)."""
        options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE_OPTIONS}
        if self.name == "teacher":  # the student-only options do not change the teacher
            for key in STUDENT_ONLY_OPTIONS:
                options.pop(key, None)
        options.update(dataclasses.asdict(self))
        return options

    def weight(self, term: str) -> float:
        return getattr(self, f"{term}_weight")


# ---------------------------------------------------------------------------------------------
# The loss, the learning rate, validation
# ---------------------------------------------------------------------------------------------


def lr_factor(cfg: Config, epochs: int, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of step ``i`` over the peak: a linear warm-up of --warmup-epochs, then
    cosine decay to 0 at the end, or x --lr-gamma from the first step of each milestone epoch."""
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    total_steps = steps_per_epoch * epochs
    milestone_steps = [m * steps_per_epoch for m in cfg.milestones]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if cfg.schedule == "step":
            return cfg.lr_gamma ** sum(step >= m for m in milestone_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def loss_terms(
    phase: Phase, cfg: Config, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
    labels: torch.Tensor, rank_watch: Stopwatch,
) -> Dict[str, torch.Tensor]:
    """Each loss term with a non-zero weight (unweighted), in float32."""
    terms: Dict[str, torch.Tensor] = {}
    if phase.ce_weight > 0:
        terms["ce"] = F.cross_entropy(student_logits, labels)
    if phase.kd_weight > 0:
        temperature = cfg.temperature
        terms["kd"] = F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean", log_target=True,
        ) * temperature**2
    if phase.rank_weight > 0:
        rank_watch.start()
        terms["rank"] = kendall_loss(
            student_logits, teacher_logits.detach(), cfg.rank_k, top_k=cfg.rank_top_k,
            hard_teacher=cfg.rank_hard_teacher, backend=cfg.rank_backend,
        )
        rank_watch.stop()
    return terms


# ---------------------------------------------------------------------------------------------
# Training one phase
# ---------------------------------------------------------------------------------------------


@dataclass
class PhaseRun:
    """What a phase trains with: built once by :func:`_set_up`, used by every epoch."""

    cfg: Config
    phase: Phase
    data: DataBundle
    teacher: Optional[nn.Module]
    runtime: Runtime
    model: nn.Module
    train_model: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sampler: DistributedSampler
    val_loader: DataLoader
    loader_options: Dict[str, Any]
    steps_per_epoch: int
    tau_stride: int
    autocast: Callable[[], Any]
    phase_dir: str
    log: Callable[..., None]

    @property
    def uses_teacher(self) -> bool:
        """A teacher given to a CE-only phase is used only to measure the validation tau."""
        return self.teacher is not None and (self.phase.kd_weight > 0 or self.phase.rank_weight > 0)


def _set_up(cfg: Config, phase: Phase, data: DataBundle, teacher: Optional[nn.Module],
            runtime: Runtime) -> PhaseRun:
    device = runtime.device
    # Everyone builds the same initial model (DDP would broadcast rank 0's anyway).
    seed_everything(cfg.seed * 1000 + phase.seed_offset)
    model = build_model(phase.arch, data.num_classes).to(device)
    # From here on each process draws its own random numbers (e.g. dropout).
    seed_everything(cfg.seed * 1000 + phase.seed_offset + 100 * (runtime.rank + 1))

    sampler = DistributedSampler(data.train, num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} exceeds the {len(sampler)} training images per process"
        )
    optimizer = torch.optim.SGD(model.parameters(), lr=phase.lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor(cfg, phase.epochs, steps_per_epoch))

    train_model: nn.Module = model
    if runtime.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    options = loader_options(cfg, device)
    tau_stride = max(1, len(data.val) // cfg.tau_images) if cfg.tau_images > 0 else 1
    log = print if runtime.is_main else (lambda *a, **k: None)
    return PhaseRun(cfg, phase, data, teacher, runtime, model, train_model, optimizer, scheduler,
                    sampler, validation_loader(cfg, data, runtime), options, steps_per_epoch,
                    tau_stride, autocaster(cfg, device), os.path.join(cfg.out, phase.name), log)


def _save(run: PhaseRun, progress: Progress, complete: bool) -> None:
    """Checkpoint the phase (rank 0 writes; every process's random state goes in)."""
    rng = checkpoint.capture_rng_state()
    rng_states = [rng]
    if run.runtime.distributed:
        rng_states = [None] * run.runtime.world_size
        dist.all_gather_object(rng_states, rng)
    if run.runtime.is_main:
        state = {"phase": run.phase.name, "arch": run.phase.arch,
                 "num_classes": run.data.num_classes, "model": run.model.state_dict(),
                 "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 **progress.state(), "rng": rng_states,
                 "options": run.phase.result_options(run.cfg), "complete": complete}
        checkpoint.save_phase(state, run.phase_dir, complete)
    if run.runtime.distributed:
        dist.barrier()


def _step(run: PhaseRun, images: torch.Tensor, labels: torch.Tensor, clock: Interval,
          running: torch.Tensor) -> torch.Tensor:
    """One optimizer step; adds the step's sums (SUM_FIELDS order) to ``running``."""
    device = run.runtime.device
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    clock.step.start()
    with run.autocast():
        logits = run.train_model(images)
        teacher_logits = None
        if run.uses_teacher:
            with torch.no_grad():
                teacher_logits = run.teacher(images)
    logits = logits.float()
    teacher_logits = teacher_logits.float() if teacher_logits is not None else None
    terms = loss_terms(run.phase, run.cfg, logits, teacher_logits, labels, clock.rank)
    total = sum(run.phase.weight(name) * value for name, value in terms.items())
    run.optimizer.zero_grad(set_to_none=True)
    total.backward()
    run.optimizer.step()
    run.scheduler.step()
    clock.step.stop()
    with torch.no_grad():
        batch = labels.numel()
        values = [terms[t].detach().double() * batch if t in terms else
                  torch.zeros((), dtype=torch.float64, device=device) for t in TERMS]
        correct = (logits.argmax(1) == labels).sum().double()
        running += torch.stack([torch.tensor(float(batch), dtype=torch.float64, device=device),
                                *values, total.detach().double() * batch, correct])
    return running


def _train_epoch(run: PhaseRun, progress: Progress) -> bool:
    """Train to the end of the epoch or to --max-steps; returns True when stopped by the latter.

    Leaves the epoch's sums and times in ``progress.stats``.
    """
    from tqdm import tqdm

    cfg, epoch = run.cfg, progress.epoch
    run.model.train()
    run.sampler.set_epoch(epoch)
    if hasattr(run.data.train, "set_epoch"):
        run.data.train.set_epoch(epoch)
    loader = DataLoader(run.data.train, batch_size=cfg.batch_size,
                        sampler=SkipFirst(run.sampler, progress.step_in_epoch * cfg.batch_size),
                        drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                        **run.loader_options)
    running = progress.stats.sums(run.runtime.device)
    clock = Interval(run.runtime.device)
    bar = tqdm(total=run.steps_per_epoch, initial=progress.step_in_epoch, leave=False,
               dynamic_ncols=True, desc=f"{run.phase.name} {epoch + 1}/{run.phase.epochs}",
               disable=not (cfg.progress and run.runtime.is_main))
    stopped_early = False
    for images, labels in loader:
        running = _step(run, images, labels, clock, running)
        progress.step_in_epoch += 1
        progress.global_step += 1
        bar.update(1)
        if progress.global_step % 20 == 0 and bar.disable is False:
            total, images = running[SUM_FIELDS.index("total")], running[SUM_FIELDS.index("images")]
            bar.set_postfix(loss=f"{total.item() / images.item():.3f}")
        at_limit = cfg.max_steps is not None and progress.global_step >= cfg.max_steps
        periodic = cfg.ckpt_every > 0 and progress.global_step % cfg.ckpt_every == 0
        if (at_limit or periodic) and progress.step_in_epoch < run.steps_per_epoch:
            progress.stats = clock.close(progress.stats, running)
            _save(run, progress, complete=False)
        if at_limit:
            stopped_early = True
            break
    bar.close()
    if progress.step_in_epoch >= run.steps_per_epoch:  # (not already closed by a mid-epoch save)
        progress.stats = clock.close(progress.stats, running)
    return stopped_early


def _end_epoch(run: PhaseRun, progress: Progress) -> List[Dict[str, Any]]:
    """Validate, log and write the outputs after an epoch (or part of one); returns the rows shown."""
    metrics = evaluate(run.model, run.teacher, run.val_loader, run.runtime, run.autocast,
                       run.tau_stride)
    # The statistics summed over processes (the per-process sums stay in the checkpoint).
    row = progress.stats.reduced(run.runtime).row(
        {term: run.phase.weight(term) for term in TERMS}, progress.epoch + 1, progress.global_step, run.optimizer.param_groups[0]["lr"],
        metrics)
    if progress.step_in_epoch >= run.steps_per_epoch:
        progress.history.append(row)
        progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
        progress.stats = EpochStats()
        _save(run, progress, complete=progress.epoch == run.phase.epochs)
        shown = progress.history
    else:
        row["epoch"] = progress.epoch + progress.step_in_epoch / run.steps_per_epoch  # partial
        shown = progress.history + [row]
    if run.runtime.is_main:
        outputs.write_csv(shown, os.path.join(run.phase_dir, "metrics.csv"))
        outputs.plot_history(shown, os.path.join(run.phase_dir, "curves.png"),
                             f"{run.phase.name}: {run.phase.arch} on {run.cfg.data}")
        run.log(f"[{run.phase.name}] epoch {row['epoch']:.4g}: " + ", ".join(
            f"{key} {row[key]:.4g}" for key in
            ("train_loss", "val_top1", "val_top5", "val_tau", "images_per_s", "rank_time_share")
            if not (isinstance(row[key], float) and math.isnan(row[key]))))
    return shown


def train_phase(
    cfg: Config, phase: Phase, data: DataBundle, teacher: Optional[nn.Module], runtime: Runtime,
) -> Dict[str, Any]:
    """Train one model; returns its summary (final metrics, wall time) and, as "model", the model.

    Resumable at any step: the checkpoint holds the model, optimizer, scheduler, position in the
    epoch, running epoch sums, history and every process's random state. The data order comes from
    DistributedSampler(seed, epoch) and the augmentation from per-sample seeds, so nothing about the
    data depends on the global random state.
    """
    run = _set_up(cfg, phase, data, teacher, runtime)
    progress = Progress()
    last_path = os.path.join(run.phase_dir, "last.pt")
    if cfg.resume:
        state = checkpoint.resume_phase(last_path, phase.result_options(cfg), run.model,
                                        run.optimizer, run.scheduler, runtime.rank,
                                        runtime.world_size, run.log)
        if state is not None:
            progress = Progress.from_state(state)
            run.log(f"[{phase.name}] resumed from {last_path} at epoch {progress.epoch + 1}, "
                    f"step {progress.global_step}")
        else:
            run.log(f"[{phase.name}] --resume: no {last_path} yet, starting from scratch")
    if runtime.is_main:
        os.makedirs(run.phase_dir, exist_ok=True)
    if teacher is not None:
        teacher.eval()
    run.log(f"[{phase.name}] {phase.arch}: {sum(p.numel() for p in run.model.parameters()):,} "
            f"parameters, {phase.epochs} epochs x {run.steps_per_epoch} steps x {cfg.batch_size} "
            f"images x {runtime.world_size} process(es) on {runtime.device}")
    phase_start = time.perf_counter()
    stopped_early = False
    shown = progress.history
    while progress.epoch < phase.epochs and not stopped_early:
        stopped_early = _train_epoch(run, progress)
        shown = _end_epoch(run, progress)
    final = shown[-1] if shown else {}
    return {
        "phase": phase.name, "arch": phase.arch, "model": run.model, "history": shown,
        "epochs": final.get("epoch", 0), "steps": progress.global_step,
        "complete": progress.epoch == phase.epochs, "wall_s": time.perf_counter() - phase_start,
        **{k: final.get(k, math.nan) for k in (
            "val_top1", "val_top5", "val_tau", "val_ce", "images_per_s", "rank_time_share")},
        "best_val_top1": max((r["val_top1"] for r in shown), default=math.nan),
    }
