"""The public loss: validation (docs/contract.md's errors, by checks.py), the ``(..., C) -> rows``
view, top_k, reduction.

Everything that is not pair math lives here, once, so that every backend only implements full rows
of a 2-D contiguous block.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch
from torch import nn

from . import backends, checks, expsum

REDUCTIONS = ("mean", "sum", "none")


def _check_options(k, top_k, reduction, backend, method="auto", hard_teacher=False) -> float:
    expsum.check_method(method, hard_teacher)
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    if backend not in backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {backends.BACKENDS}")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
            raise ValueError(f"top_k must be an int or None, got {top_k!r}")
        if top_k < 2:
            raise ValueError(f"top_k must be at least 2, got {top_k}")
    return checks.check_k(k)


def _check_tensors(student, teacher, top_k) -> None:
    checks.check_logits(student, teacher)
    if top_k is not None and top_k > student.shape[-1]:
        raise ValueError(f"top_k must lie in [2, C={student.shape[-1]}], got {top_k}")


def _nan_where_non_finite(x: torch.Tensor) -> torch.Tensor:
    """Per row (keepdim): 0 when all its values are finite, NaN when one is infinite or NaN.

    A row holds an infinite or NaN value exactly when its minimum or maximum is one (torch's min
    and max propagate NaN), and 0 * x is NaN for those and 0 for the rest: one pass over the
    input and no rows x C temporary.
    """
    low, high = torch.aminmax(x.detach(), dim=-1, keepdim=True)
    return low * 0 + high * 0


def _teacher_top_k(student: torch.Tensor, teacher: torch.Tensor, top_k: int):
    """Keep, per row, the ``top_k`` channels with the largest teacher logits (torch.topk's ties).

    Autograd scatters the gradient of the gathered channels back; the others get zero. A non-finite
    logit outside the kept channels must still make its row NaN (docs/contract.md), so such rows are
    poisoned with a detached NaN before the op; no host-device synchronisation is involved.
    """
    index = teacher.detach().topk(top_k, dim=-1).indices
    poison = _nan_where_non_finite(student) + _nan_where_non_finite(teacher)
    return student.gather(-1, index) + poison, teacher.gather(-1, index) + poison


def kendall_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    k: float = 1.0,
    *,
    hard_teacher: bool = False,
    top_k: Optional[int] = None,
    reduction: str = "mean",
    backend: str = "auto",
    method: str = "auto",
) -> torch.Tensor:
    """Soft-Kendall ranking loss ``1 - tau`` between student and teacher logits (RKKD).

    For each row (every index but the last dimension) of C logits::

        tau = 1/P * sum_{i<j} tanh(k (s_i - s_j)) * w_ij,   P = C (C - 1) / 2
        w_ij = tanh(k (t_i - t_j))   or   sign(t_i - t_j) with ``hard_teacher=True``

    Args:
        student_logits: ``(..., C)`` floating tensor, any strides.
        teacher_logits: the same shape and device (usually detached).
        k: steepness of the tanh, a positive finite number.
        hard_teacher: use sign() of the teacher's differences (no gradient to the teacher).
        top_k: only the pairs among the ``top_k`` channels with the largest teacher logits.
        reduction: ``"mean"`` over rows, ``"sum"`` or ``"none"`` (shape ``(...)``).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.
        method: with a hard teacher, ``"pairs"`` (every pair, O(C^2) per row), ``"expsum"`` (the
            exponential sums along the teacher's order, O(C log C + C M), see ``expsum.py``) or
            ``"auto"``, which picks by a cost model of C, k and the dtype. A soft teacher always
            uses the pairs (``"expsum"`` is then a ValueError).

    Returns:
        The loss in ``[0, 2]`` per row, reduced as asked, in the (promoted) input dtype.

    Raises:
        ValueError: differing shapes or devices, ``C < 2``, ``top_k`` outside ``[2, C]``, a bad
            ``k``, an unknown ``reduction``, ``backend`` or ``method``, ``method="expsum"`` with a soft
            teacher or on a backend without it.
        TypeError: a non-floating dtype.
        RuntimeError: a forced backend that is not available here (the message says what to install).
    """
    k = _check_options(k, top_k, reduction, backend, method, hard_teacher)
    _check_tensors(student_logits, teacher_logits, top_k)
    chosen = backends.choose(backend, student_logits.device)

    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    batch_shape = student_logits.shape[:-1]
    c = student_logits.shape[-1]
    student = student_logits.to(dtype).reshape(-1, c)
    teacher = teacher_logits.to(dtype).reshape(-1, c)
    if top_k is not None and top_k < c:
        student, teacher = _teacher_top_k(student, teacher, top_k)

    # Per-row losses come in the accumulation dtype (float32 for half types), so the reduction
    # below sums in it; only the result is rounded to the input dtype.
    how = expsum.choose(method, chosen, student.shape[-1], k, student.dtype, bool(hard_teacher))
    rows_loss = backends.EXPSUM_DISPATCH[chosen] if how == "expsum" else backends.DISPATCH[chosen]
    loss_rows = rows_loss(student, teacher, k, bool(hard_teacher))
    if reduction == "mean":
        out = loss_rows.mean()
    elif reduction == "sum":
        out = loss_rows.sum()
    else:
        out = loss_rows.reshape(batch_shape)
    return out.to(dtype)


class KendallLoss(nn.Module):
    """Module form of :func:`kendall_loss`; the options are checked once, here."""

    # kendall_loss's options spelled out again: both signatures are public (the one repeat that
    # `duplicates` reports in rkkd_kernels/).
    def __init__(
        self,
        k: float = 1.0,
        hard_teacher: bool = False,
        top_k: Optional[int] = None,
        reduction: str = "mean",
        backend: str = "auto",
        method: str = "auto",
    ) -> None:
        super().__init__()
        self.k = _check_options(k, top_k, reduction, backend, method, hard_teacher)
        self.hard_teacher = bool(hard_teacher)
        self.top_k = top_k
        self.reduction = reduction
        self.backend = backend
        self.method = method

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return kendall_loss(
            student_logits,
            teacher_logits,
            self.k,
            hard_teacher=self.hard_teacher,
            top_k=self.top_k,
            reduction=self.reduction,
            backend=self.backend,
            method=self.method,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, hard_teacher={self.hard_teacher}, top_k={self.top_k}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, method={self.method!r}"
        )
