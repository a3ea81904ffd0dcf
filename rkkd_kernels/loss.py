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
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__} ({top_k!r})")
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

    The loss and both gradients come from one fused pass over the pairs, with O(rows x C) extra
    memory; nothing of size C x C is stored (except by ``backend="reference"``).

    Args:
        student_logits: ``(..., C)`` floating tensor, any strides; C >= 2.
        teacher_logits: the same shape and device; detach it unless the teacher should learn.
        k: steepness of the tanh, a positive finite number. Small k weighs each pair by its logit
            difference; large k approaches a count of discordant pairs. Each logit's gradient from
            a row is at most ``2k / C`` in size.
        hard_teacher: weigh a pair by sign() of the teacher's difference instead of tanh(); the
            teacher then gets no gradient.
        top_k: rank only the ``top_k`` classes with the largest teacher logits of each row
            (``torch.topk``'s ties); the others get a zero gradient. None: all C classes.
        reduction: ``"mean"`` over rows, ``"sum"``, or ``"none"`` (one loss per row, shape ``(...)``).
        backend: ``"auto"`` (Triton for CUDA tensors, else the CUDA extension; the C++ kernel for
            CPU tensors), ``"triton"``, ``"cuda"``, ``"cpu"``, or ``"reference"`` (plain PyTorch,
            rows x C x C memory; the tests' oracle). ``available_backends()`` says what runs here.
        method: with a hard teacher, ``"pairs"`` (every pair, O(C^2) per row), ``"expsum"``
            (exponential sums along the teacher's order, O(C log C + C M), M growing with k times
            the row's logit spread; the ``"cpu"`` and ``"triton"`` backends), or ``"auto"``, which picks on the host from C, k
            and the dtype alone. Both meet the same precision. A soft teacher always uses the pairs.

    Returns:
        The loss in ``[0, 2]`` per row, reduced as asked, in the (promoted) input dtype. float16 and
        bfloat16 inputs are computed in float32, float64 in float64.

    Non-finite values: a NaN or an infinity anywhere in a row (of either input, inside or outside
    the ``top_k`` classes) makes that row's loss and gradients NaN (a hard teacher's gradient stays
    zero); other rows are unaffected. Finding such rows never synchronises with the device.

    First call: the CPU and CUDA kernels are compiled when the package is built, so their first call
    costs nothing extra. On a GPU the default Triton kernel is compiled by Triton the first time a
    process uses it, and its tile configuration is tuned for each new C unless the environment
    variable ``RKKD_TRITON_CONFIG`` (e.g. ``64:8``) pins one.

    Raises:
        ValueError: differing shapes or devices, ``C < 2``, a ``k`` that is not finite and above
            zero, a ``top_k`` outside ``[2, C]``, an unknown ``reduction``, ``backend`` or ``method``,
            ``method="expsum"`` with a soft teacher or on a backend without it.
        TypeError: an input that is not a tensor, or not of a floating dtype; a ``k`` that is not
            a Python number (a tensor ``k`` included: pass ``float(k)``); a ``top_k`` that is not
            an int or None.
        RuntimeError: a forced backend that cannot run here (the message says what to install or
            which device it needs); a second derivative through the loss.
        The repository's docs/contract.md lists every rule, arguments of a wrong type included.

    Example::

        >>> import torch
        >>> from rkkd_kernels import kendall_loss
        >>> student = torch.randn(8, 100, requires_grad=True)
        >>> teacher = torch.randn(8, 100)
        >>> loss = kendall_loss(student, teacher, k=1.0)
        >>> loss.backward()
        >>> student.grad.shape
        torch.Size([8, 100])
        >>> kendall_loss(student.detach(), teacher, hard_teacher=True, top_k=10, reduction="none").shape
        torch.Size([8])
    """
    k = _check_options(k, top_k, reduction, backend, method, hard_teacher)
    _check_tensors(student_logits, teacher_logits, top_k)
    chosen = backends.choose(backend, student_logits.device)

    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    batch_shape = student_logits.shape[:-1]
    c = student_logits.shape[-1]
    # A 2-D input is already the rows: no reshape, which costs a view and its autograd node.
    student, teacher = student_logits.to(dtype), teacher_logits.to(dtype)
    if student.dim() != 2:
        student, teacher = student.reshape(-1, c), teacher.reshape(-1, c)
    if top_k is not None and top_k < c:
        student, teacher = _teacher_top_k(student, teacher, top_k)

    # Per-row losses come in the accumulation dtype (float32 for half types), so the reduction
    # below sums in it; only the result is rounded to the input dtype.
    how = expsum.choose(method, chosen, student.shape[-1], k, student.dtype, bool(hard_teacher))
    rows_loss = backends.EXPSUM_DISPATCH[chosen] if how == "expsum" else backends.DISPATCH[chosen]
    loss_rows = rows_loss(student, teacher, k, bool(hard_teacher))
    # A row whose pairs all saturate sums tau to P (1 +- a few ulps): 1 - tau can land ~1e-16 outside
    # [0, 2]. The value is held in the range; the gradient passes through unchanged (a plain clamp
    # would zero it there). Values inside the range, and NaN rows, are unchanged. In place and
    # untracked: no backward reads the loss rows, and two in-place ops cost a third of an
    # out-of-place, straight-through clamp on a small call. (clamp_min_ and clamp_max_ have vmap
    # batching rules; clamp_ has none.)
    with torch.no_grad():
        loss_rows.clamp_min_(0.0).clamp_max_(2.0)
    if reduction == "mean":
        out = loss_rows.mean()
    elif reduction == "sum":
        out = loss_rows.sum()
    else:
        out = loss_rows.reshape(batch_shape)
    return out.to(dtype)


class KendallLoss(nn.Module):
    """The soft-Kendall ranking loss ``1 - tau`` of :func:`kendall_loss` as a module.

    The options are checked once, when the module is made; calling it with ``(student_logits,
    teacher_logits)`` returns ``kendall_loss(student_logits, teacher_logits, k, ...)`` with them.

    Args:
        k: steepness of the tanh, a positive finite number (default 1.0).
        hard_teacher: weigh pairs by sign() of the teacher's differences (the teacher then gets no
            gradient) instead of tanh() (default False).
        top_k: rank only the ``top_k`` classes with the largest teacher logits of each row; None
            (default) ranks all C.
        reduction: ``"mean"`` over rows (default), ``"sum"`` or ``"none"``.
        backend: ``"auto"`` (default), ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.
        method: ``"auto"`` (default), ``"pairs"`` or ``"expsum"`` (a hard teacher only).

    See :func:`kendall_loss` for what each option does, the NaN rule and the errors.

    Example::

        >>> import torch
        >>> from rkkd_kernels import KendallLoss
        >>> criterion = KendallLoss(k=1.0, top_k=10)
        >>> student = torch.randn(4, 100, requires_grad=True)
        >>> loss = criterion(student, torch.randn(4, 100))
        >>> loss.backward()
        >>> criterion
        KendallLoss(k=1.0, hard_teacher=False, top_k=10, reduction='mean', backend='auto', method='auto')
    """

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
        """The loss of ``student_logits`` against ``teacher_logits`` with this module's options.

        Args:
            student_logits: ``(..., C)`` floating tensor, any strides; C >= 2.
            teacher_logits: the same shape and device; detach it unless the teacher should learn.

        Returns:
            The loss in ``[0, 2]`` per row, reduced by ``reduction``, in the (promoted) input dtype.
        """
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
