"""The Kendall term as a torchdistill mid-level loss, registered under the key ``KendallLoss``.

Importing this module registers the loss with torchdistill, so a torchdistill YAML config lists the
module under ``dependencies`` and adds the term to its ``WeightedSumLoss`` beside ``KDLoss``::

    dependencies:
      - name: 'rkkd_kernels.integrations.torchdistill'
    ...
    criterion:
      key: 'WeightedSumLoss'
      kwargs:
        sub_terms:
          kd: ...                      # torchdistill's own KDLoss, unchanged
          kendall:
            criterion:
              key: 'KendallLoss'
              kwargs:
                student_module_path: '.'
                student_module_io: 'output'
                teacher_module_path: '.'
                teacher_module_io: 'output'
                k: 1.0
            weight: 1.0

The weight lives in the sub-term, as for every torchdistill loss. docs/torchdistill.md shows the
whole set-up; configs/torchdistill/ holds configs to copy.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import nn

try:
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as err:  # the extra is optional: say how to get it
    raise ImportError(
        "rkkd_kernels.integrations.torchdistill needs torchdistill (which needs torch >= 2.12): "
        "pip install 'rkkd-kernels[torchdistill]'"
    ) from err

from rkkd_kernels import KendallLoss

__all__ = ["REGISTRY_KEY", "TorchdistillKendallLoss"]

REGISTRY_KEY = "KendallLoss"
# A weighted sum of torchdistill terms needs one number per term, so no "none".
REDUCTIONS = ("mean", "sum")


def _find_logits(io_dict: Any, side: str, path: str, io: str) -> torch.Tensor:
    """The tensor that torchdistill recorded as ``io_dict[path][io]``, or an error naming both."""
    if not isinstance(io_dict, Mapping):
        raise TypeError(f"KendallLoss: the {side} io dict must be a mapping, got {type(io_dict).__name__}")
    if path not in io_dict:
        raise ValueError(
            f"KendallLoss: {side}_module_path {path!r} is not in the {side} io dict (its paths: "
            f"{sorted(io_dict)}); a path other than '.' needs a forward hook in the config "
            f"(train.{side}.forward_hook.{io}: [{path!r}])"
        )
    entry = io_dict[path]
    if not isinstance(entry, Mapping) or io not in entry:
        recorded = sorted(entry) if isinstance(entry, Mapping) else entry
        raise ValueError(
            f"KendallLoss: {side}_module_io {io!r} was not recorded for {side}_module_path {path!r} "
            f"(recorded: {recorded})"
        )
    logits = entry[io]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"KendallLoss: the {side}'s {io} at {path!r} is a {type(logits).__name__}, "
            "not a tensor of logits"
        )
    if logits.dim() < 2:
        raise ValueError(
            f"KendallLoss: the {side}'s {io} at {path!r} has shape {tuple(logits.shape)}; "
            "logits need the shape (N, C) or (N, C, ...)"
        )
    return logits


@register_mid_level_loss(key=REGISTRY_KEY)
class TorchdistillKendallLoss(nn.Module):
    """:func:`rkkd_kernels.kendall_loss` between the student's and the teacher's logits, found in
    torchdistill's io dicts by module path and io as torchdistill's ``KDLoss`` finds them.

    The classes lie along dimension 1, as for ``KDLoss`` (``(N, C)``, or ``(N, C, H, W)`` for dense
    outputs, where every position is a row). The teacher's logits are detached: the term moves the
    student towards the teacher's ranking. ``targets`` are not used.

    Args:
        student_module_path: the student module whose input or output holds the logits (``'.'``:
            the model itself).
        student_module_io: ``'output'`` or ``'input'`` of that module.
        teacher_module_path: the same for the teacher.
        teacher_module_io: the same for the teacher.
        k: steepness of the tanh (see :func:`rkkd_kernels.kendall_loss`).
        hard_teacher: sign() of the teacher's differences instead of tanh.
        top_k: only the pairs among the ``top_k`` classes with the largest teacher logits.
        method: ``"auto"``, ``"pairs"`` or ``"expsum"`` (the latter with a hard teacher only).
        reduction: ``"mean"`` (over rows) or ``"sum"``.
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.

    Raises:
        ValueError: a bad option, here; at the call, a path or io missing from the io dicts, or
            student and teacher logits of different shapes (the message names both).
        TypeError: a non-string path or io, or a recorded value that is not a tensor.
    """

    def __init__(
        self,
        student_module_path: str,
        student_module_io: str,
        teacher_module_path: str,
        teacher_module_io: str,
        k: float = 1.0,
        hard_teacher: bool = False,
        top_k: Optional[int] = None,
        method: str = "auto",
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("student_module_path", student_module_path),
                            ("student_module_io", student_module_io),
                            ("teacher_module_path", teacher_module_path),
                            ("teacher_module_io", teacher_module_io)):
            if not isinstance(value, str):
                raise TypeError(f"KendallLoss: {name} must be a string, got {value!r}")
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"KendallLoss: reduction must be one of {REDUCTIONS} for a term of a weighted sum, "
                f"got {reduction!r}"
            )
        self.student_module_path = student_module_path
        self.student_module_io = student_module_io
        self.teacher_module_path = teacher_module_path
        self.teacher_module_io = teacher_module_io
        # rkkd_kernels' module checks k, top_k, method and backend now, so a bad config fails when
        # torchdistill builds its criterion, not at the first step.
        self.kendall = KendallLoss(k, hard_teacher, top_k, reduction, backend, method)

    def forward(self, student_io_dict: Mapping[str, Any], teacher_io_dict: Mapping[str, Any],
                targets: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The loss on the logits at the configured paths (torchdistill's mid-level signature)."""
        student = _find_logits(student_io_dict, "student", self.student_module_path,
                               self.student_module_io)
        teacher = _find_logits(teacher_io_dict, "teacher", self.teacher_module_path,
                               self.teacher_module_io)
        if student.shape != teacher.shape:
            raise ValueError(
                f"KendallLoss: the student's {self.student_module_io} at "
                f"{self.student_module_path!r} has shape {tuple(student.shape)} but the teacher's "
                f"{self.teacher_module_io} at {self.teacher_module_path!r} has shape "
                f"{tuple(teacher.shape)}; they must be equal"
            )
        # kendall_loss ranks along the last dimension; torchdistill's classes are on dimension 1.
        student = student.movedim(1, -1)
        teacher = teacher.detach().movedim(1, -1)
        return self.kendall(student, teacher)  # kendall_loss with the checked options

    def extra_repr(self) -> str:
        return (f"student={self.student_module_path!r}:{self.student_module_io}, "
                f"teacher={self.teacher_module_path!r}:{self.teacher_module_io}")
