"""The running statistics of an epoch, their clocks, and a phase's position (what resumes it)."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch

from .runtime import Runtime, Stopwatch, all_reduce_sum

TERMS = ("ce", "kd", "rank")


# The summed fields of EpochStats, in the order of the vector that accumulates them on the device.
SUM_FIELDS = ("images", "ce", "kd", "rank", "total", "correct")


@dataclass
class EpochStats:
    """One process's running sums over the epoch so far (loss terms are summed x batch size)."""

    images: float = 0.0
    ce: float = 0.0
    kd: float = 0.0
    rank: float = 0.0
    total: float = 0.0  # the weighted loss
    correct: float = 0.0  # training images classified right
    seconds: float = 0.0  # wall time, data loading included
    step_s: float = 0.0  # time of the training steps (forward, backward, optimizer)
    rank_s: float = 0.0  # time of the kendall_loss calls

    def sums(self, device: torch.device) -> torch.Tensor:
        """The summed fields as one float64 vector (accumulated on the device, without syncing)."""
        return torch.tensor([getattr(self, name) for name in SUM_FIELDS], dtype=torch.float64,
                            device=device)

    def with_sums(self, vector: torch.Tensor) -> "EpochStats":
        """A copy whose summed fields are read from ``vector`` (as made by :meth:`sums`)."""
        values = vector.cpu().tolist()
        return dataclasses.replace(self, **dict(zip(SUM_FIELDS, values)))

    def reduced(self, runtime: Runtime) -> "EpochStats":
        """The sums over every process (the times stay this process's)."""
        return self.with_sums(all_reduce_sum(self.sums(runtime.device), runtime))

    def row(self, weights: Dict[str, float], epoch: float, step: int, lr: float,
            metrics: Dict[str, float]) -> Dict[str, Any]:
        """The metrics.csv row of these statistics and the validation ``metrics``.

        ``weights``: each term's loss weight (a term of weight 0 was not computed: NaN).
        """
        n = max(1.0, self.images)
        row: Dict[str, Any] = {"epoch": epoch, "step": step, "lr": lr}
        for term in TERMS:
            row[f"train_{term}"] = getattr(self, term) / n if weights[term] > 0 else math.nan
        row["train_loss"] = self.total / n
        row["train_top1"] = 100.0 * self.correct / n
        row.update(metrics)
        row["images_per_s"] = n / max(1e-9, self.seconds)
        row["rank_time_share"] = (self.rank_s / self.step_s
                                  if weights["rank"] > 0 and self.step_s > 0 else math.nan)
        row["epoch_s"] = self.seconds
        return row


class Interval:
    """The clocks of the steps since the last time the running sums were written back."""

    def __init__(self, device: torch.device):
        self.device = device
        self.restart()

    def restart(self) -> None:
        self.step, self.rank = Stopwatch(self.device), Stopwatch(self.device)
        self.wall_start = time.perf_counter()

    def close(self, stats: EpochStats, running: torch.Tensor) -> EpochStats:
        """``stats`` with the running sums and this interval's times; the clocks restart."""
        closed = stats.with_sums(running)
        closed.seconds += time.perf_counter() - self.wall_start
        closed.step_s += self.step.total()
        closed.rank_s += self.rank.total()
        self.restart()
        return closed


@dataclass
class Progress:
    """Where a phase stands: what a checkpoint holds besides the model, optimizer and scheduler."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    history: List[Dict[str, Any]] = field(default_factory=list)
    stats: EpochStats = field(default_factory=EpochStats)

    def state(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "global_step": self.global_step, "history": self.history,
                "stats": dataclasses.asdict(self.stats)}

    @classmethod
    def from_state(cls, state: Dict[str, Any]) -> "Progress":
        return cls(state["epoch"], state["step_in_epoch"], state["global_step"], state["history"],
                   EpochStats(**state["stats"]))
