"""The plain PyTorch soft-Kendall loss: materializes C x C per row, autograd derives the gradients.

This is the oracle of the tests and the baseline of the benchmarks, written to be read, not to be
fast. Its extra memory is rows * C * C, which is exactly what the other backends avoid.
"""

from __future__ import annotations

import torch

from .dtypes import accumulation_dtype


def _row_centre(x: torch.Tensor) -> torch.Tensor:
    """0.5 * max + 0.5 * min of each row, detached (NaN for a row holding a NaN)."""
    x = x.detach()
    return 0.5 * x.amax(-1, keepdim=True) + 0.5 * x.amin(-1, keepdim=True)


def kendall_reference_rows(
    student: torch.Tensor, teacher: torch.Tensor, k: float, hard_teacher: bool = False
) -> torch.Tensor:
    """The reference loss per row: the oracle that the tests hold every fast backend to.

    Plain PyTorch, written to be read: it builds the C x C matrices of pair terms of every row
    (memory rows x C x C) and lets autograd derive the gradients. Use it to check a result, not to
    train; ``kendall_loss(..., backend="reference")`` runs it behind the usual checks, ``top_k`` and
    reduction.

    tau = (1 / P) * sum_{i<j} tanh(k (s_i - s_j)) * w_ij, with w_ij = tanh(k (t_i - t_j)) or
    sign(t_i - t_j). The summand is symmetric under i <-> j and zero on the diagonal, so the sum
    over the whole C x C matrix is twice the sum over i < j.

    Args:
        student: ``(rows, C)`` floating tensor.
        teacher: ``(rows, C)`` floating tensor on the same device.
        k: steepness, a positive finite number (not checked here).
        hard_teacher: sign() of the teacher's differences instead of tanh().

    Returns:
        ``(rows,)``: each row's ``1 - tau``, in float64 for a float64 student and in float32
        otherwise (both inputs are cast to that dtype first). A NaN or an infinity in a row makes
        that row's loss and gradients NaN.

    Example::

        >>> import torch
        >>> from rkkd_kernels import kendall_loss, kendall_reference_rows
        >>> s, t = torch.randn(4, 50, dtype=torch.float64), torch.randn(4, 50, dtype=torch.float64)
        >>> torch.allclose(kendall_reference_rows(s, t, 1.0), kendall_loss(s, t, 1.0, reduction="none"))
        True
    """
    acc = accumulation_dtype(student.dtype)
    s = student.to(acc)
    t = teacher.to(acc)
    # Subtracting the row centre changes nothing mathematically (the loss is shift invariant), but a
    # non-finite logit then turns its whole row, loss and gradients, into NaN (docs/contract.md).
    # The centre (max + min) / 2 with halves first, as in the kernels: a mean, or max + min, would
    # overflow for rows near the dtype's largest value. Detached: a shift carries no gradient.
    s = s - _row_centre(s)
    t = t - _row_centre(t)
    c = s.shape[-1]
    pairs = c * (c - 1) / 2

    phi = torch.tanh(k * (s[:, :, None] - s[:, None, :]))
    t_diff = t[:, :, None] - t[:, None, :]
    w = torch.sign(t_diff) if hard_teacher else torch.tanh(k * t_diff)
    tau = (phi * w).sum(dim=(1, 2)) / (2 * pairs)
    return 1 - tau
