"""The checks at the boundary: one set of rules for the public loss and for every op.

``kendall_loss`` raises the contract's ValueError or TypeError (docs/contract.md, "Bad input");
an op called directly raises RuntimeError naming itself, as torch's own ops do. The C++ ops mirror
the op's rules once, in ``csrc/kendall_op.h``.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Tuple, Type

import torch

Problem = Tuple[Type[Exception], str]


class KRange(NamedTuple):
    """A backend's narrower range of k, low <= k < high, and why (docs/contract.md, "Precision")."""

    low: float
    high: float
    text: str


def _k_problem(k) -> Optional[str]:
    if isinstance(k, bool) or not isinstance(k, numbers.Real) or not (math.isfinite(k) and k > 0):
        return f"k must be a positive finite number, got {k!r}"
    return None


def _logits_problem(student, teacher, op: bool) -> Optional[Problem]:
    """The first rule the two inputs break, with the public API's exception type; ``op``: the op's
    stricter inputs, two (rows, C) tensors of one dtype."""
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            return TypeError, f"{name} logits must be a torch.Tensor, got {type(x).__name__}"
        if not x.is_floating_point():
            return TypeError, f"{name} logits must have a floating dtype, got {x.dtype}"
    if student.device != teacher.device:
        return ValueError, f"student and teacher are on different devices ({student.device} and {teacher.device})"
    if student.shape != teacher.shape:
        return ValueError, f"student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
    if op and student.dim() != 2:
        return ValueError, f"expects two (rows, C) tensors, got shape {tuple(student.shape)}"
    if op and student.dtype != teacher.dtype:
        return TypeError, f"expects one floating dtype, got {student.dtype} and {teacher.dtype}"
    if student.dim() == 0 or student.shape[-1] < 2:
        return ValueError, f"the last dimension holds the C >= 2 classes; got shape {tuple(student.shape)}"
    return None


def check_k(k) -> float:
    """``k`` as a float: TypeError unless it is a real number (a tensor included: reading its value
    would synchronise with the device and break torch.compile's graph), ValueError unless it is
    positive and finite."""
    if isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a Python float, got a tensor ({k!r}); pass float(k) "
                        "(reading a tensor's value syncs with its device and breaks torch.compile's graph)")
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise TypeError(f"k must be a Python float, got {type(k).__name__} ({k!r})")
    problem = _k_problem(k)
    if problem is not None:
        raise ValueError(problem)
    return float(k)


def check_logits(student, teacher) -> None:
    """The public API's rules for its two ``(..., C)`` inputs (dtypes may differ: they are promoted)."""
    problem = _logits_problem(student, teacher, op=False)
    if problem is not None:
        error, message = problem
        raise error(message)


def check_op_inputs(op_name: str, student, teacher, k, k_range: Optional[KRange] = None,
                    max_rows: Optional[int] = None) -> None:
    """RuntimeError naming ``op_name`` unless the op's contract (ops.py) holds: two (rows, C >= 2)
    floating tensors of one shape, dtype and device, a positive finite k (within ``k_range`` where a
    backend is narrower) and at most ``max_rows`` rows."""
    problem = _logits_problem(student, teacher, op=True)
    message = problem[1] if problem is not None else _k_problem(k)
    if message is None and k_range is not None and not k_range.low <= k < k_range.high:
        message = f"needs k in {k_range.text}, got {k}"
    if message is None and max_rows is not None and student.shape[0] > max_rows:
        message = f"takes at most {max_rows} rows, got {student.shape[0]}"
    if message is not None:
        raise RuntimeError(f"{op_name}: {message}")
