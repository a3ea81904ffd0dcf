"""End-to-end figure: one training step of a ResNet-18 student with the Kendall term.

The step is what a distillation loop does per batch once the teacher's logits are known:
zero the gradients, the student's forward, cross-entropy plus the Kendall term, backward, SGD step.
The teacher's logits are a fixed tensor (as if cached), so its forward is not part of the step.

Reported per backend of the Kendall term: the step time, the step time with cross-entropy alone, the
time of the Kendall term by itself (forward+backward on logits of the step's shape) and its share of
the step, and the step's peak extra memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .measure import STEEPNESS, PeakExtraMemory, time_calls, wall_seconds
from rkkd_kernels import kendall_loss

NUM_CLASSES = 1000


@dataclass(frozen=True)
class E2ESpec:
    backend: str
    device: str
    batch: int = 64
    image_px: int = 32
    min_run_time_s: float = 2.0
    min_reps: int = 3
    seed: int = 0
    # The step without the Kendall term does not depend on the backend: measured once per run.
    with_ce_only: bool = True


def _setup(spec: E2ESpec):
    import torchvision

    torch.manual_seed(spec.seed)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES).to(spec.device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(spec.batch, 3, spec.image_px, spec.image_px, device=spec.device)
    labels = torch.randint(0, NUM_CLASSES, (spec.batch,), device=spec.device)
    teacher_logits = torch.randn(spec.batch, NUM_CLASSES, device=spec.device)

    def step(with_kendall: bool) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            if with_kendall:
                loss = loss + kendall_loss(logits, teacher_logits, STEEPNESS, backend=spec.backend)
            loss.backward()
            optimizer.step()

        return run

    logits_alone = torch.randn(spec.batch, NUM_CLASSES, device=spec.device, requires_grad=True)

    def kendall_alone() -> None:
        loss = kendall_loss(logits_alone, teacher_logits, STEEPNESS, backend=spec.backend)
        torch.autograd.grad(loss, logits_alone)

    return step(True), step(False), kendall_alone


def measure_e2e_times(spec: E2ESpec) -> Dict[str, Any]:
    step, step_ce_only, kendall_alone = _setup(spec)
    result: Dict[str, Any] = {}
    measured = [("step", step), ("kendall", kendall_alone)]
    if spec.with_ce_only:
        measured.append(("step_ce_only", step_ce_only))
    for name, fn in measured:
        once_s = wall_seconds(fn, spec.device)  # the warm-up, and an (over)estimate of one call
        timing = time_calls(fn, spec.device, once_s, spec.min_run_time_s, spec.min_reps)
        result[f"{name}_ms"] = timing.median_ms
        result[f"{name}_iqr_ms"] = timing.iqr_ms
        result[f"{name}_min_ms"] = timing.min_ms
    result["kendall_share"] = result["kendall_ms"] / result["step_ms"]
    return result


def measure_e2e_memory(spec: E2ESpec) -> Dict[str, Optional[float]]:
    """Peak extra memory of one whole step (with the Kendall term) after a warm-up step."""
    step, _, _ = _setup(spec)
    step()
    peak = PeakExtraMemory(spec.device)
    peak.start()
    step()
    return {"step_peak_mem_mb": peak.stop()}
