"""Validation: loss, top-1 and top-5, and the Kendall tau between the student's and the teacher's
logits; also the check of a given teacher before training."""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from rkkd_kernels import kendall_loss

from .config import Config
from .data import DataBundle
from .runtime import Runtime, Shard, all_reduce_sum, autocaster, loader_options

# Steepness used to measure the (hard) Kendall tau on validation with the fused kernel:
# tanh(1e6 * d) is +-1 in float32 for any |d| > 1e-5, so 1 - loss is Kendall's tau-a.
TAU_METRIC_K = 1e6


@torch.no_grad()
def evaluate(
    model: nn.Module, teacher: Optional[nn.Module], loader: DataLoader, runtime: Runtime,
    autocast_ctx, tau_stride: int = 1,
) -> Dict[str, float]:
    """Validation CE, top-1, top-5 (in %), and the mean student-teacher Kendall tau per image.

    The tau uses every ``tau_stride``-th image of each batch: it costs C^2 pair terms per image.
    """
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=runtime.device)  # n, ce, top1, top5, n_tau, tau
    for images, labels in loader:
        images = images.to(runtime.device, non_blocking=True)
        labels = labels.to(runtime.device, non_blocking=True)
        with autocast_ctx():
            logits = model(images)
            teacher_logits = teacher(images) if teacher is not None else None
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums[0] += labels.numel()
        sums[1] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[2] += hits[:, 0].sum()
        sums[3] += hits.any(dim=1).sum()
        if teacher_logits is not None:
            student_rows = logits[::tau_stride]
            teacher_rows = teacher_logits.float()[::tau_stride]
            # The loss is 1 - tau per row, so sum(tau) = rows - sum(loss).
            sums[4] += student_rows.shape[0]
            sums[5] += student_rows.shape[0] - kendall_loss(
                student_rows, teacher_rows, TAU_METRIC_K, hard_teacher=True, reduction="sum"
            ).double()
    all_reduce_sum(sums, runtime)
    n = max(1.0, sums[0].item())
    return {
        "val_ce": sums[1].item() / n,
        "val_top1": 100.0 * sums[2].item() / n,
        "val_top5": 100.0 * sums[3].item() / n,
        "val_tau": sums[5].item() / max(1.0, sums[4].item()) if teacher is not None else math.nan,
    }


def validation_loader(cfg: Config, data: DataBundle, runtime: Runtime) -> DataLoader:
    """This process's shard of the validation set, in order."""
    return DataLoader(data.val, batch_size=cfg.batch_size * 2,
                      sampler=Shard(len(data.val), runtime.rank, runtime.world_size),
                      generator=torch.Generator().manual_seed(cfg.seed),
                      **loader_options(cfg, runtime.device))


def evaluate_teacher(cfg: Config, teacher: nn.Module, data: DataBundle,
                     runtime: Runtime) -> Dict[str, float]:
    """A given teacher's validation CE, top-1 and top-5: a check of its weights before training."""
    metrics = evaluate(teacher, None, validation_loader(cfg, data, runtime), runtime,
                       autocaster(cfg, runtime.device))
    metrics.pop("val_tau")
    return metrics
