"""The fused op ``rkkd::kendall`` and the autograd that every fast backend shares.

Contract of the op (every backend implements exactly this, on a 2-D contiguous block):

    kendall(student, teacher, k, hard_teacher, need_grad_student, need_grad_teacher)
        -> (loss_rows, grad_student, grad_teacher)

- ``student``, ``teacher``: ``(rows, C)``, contiguous, the same floating dtype, ``C >= 2``.
- ``loss_rows``: ``(rows,)``, ``1 - tau`` per row, in the accumulation dtype (float64 for float64,
  float32 otherwise).
- ``grad_*``: ``(rows, C)`` in the accumulation dtype, d loss_row / d input, computed in the same pass
  as the loss because that pass already visits every pair; ``(0,)`` when not asked for.
- A row holding a non-finite logit gets NaN loss and NaN gradients (the hard teacher's gradient is
  identically zero and stays zero).

The forward writes the gradients, so the backward is one multiplication by ``grad_output``: no kernel
is written twice and nothing of size C x C is ever stored (FlashAttention would recompute instead;
here the gradients are only O(rows * C), so storing them is the cheaper choice).

The schema is defined here, in Python, so that it exists whichever compiled parts are present; the
C++ extensions only register implementations for the CPU and CUDA dispatch keys, and the Triton
kernel registers its own op (``rkkd::kendall_triton``) with the same signature and the same autograd.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .reference import accumulation_dtype

SCHEMA = (
    "(Tensor student, Tensor teacher, float k, bool hard_teacher, bool need_grad_student, "
    "bool need_grad_teacher) -> (Tensor, Tensor, Tensor)"
)

_lib = torch.library.Library("rkkd", "FRAGMENT")
_lib.define("kendall" + SCHEMA)


def kendall_fake(
    student: torch.Tensor,
    teacher: torch.Tensor,
    k: float,
    hard_teacher: bool,
    need_grad_student: bool,
    need_grad_teacher: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes and dtypes of the op's outputs, for torch.compile and meta tensors."""
    acc = accumulation_dtype(student.dtype)
    rows, c = student.shape
    loss = student.new_empty((rows,), dtype=acc)
    grad_s = student.new_empty((rows, c) if need_grad_student else (0,), dtype=acc)
    grad_t = student.new_empty((rows, c) if need_grad_teacher else (0,), dtype=acc)
    return loss, grad_s, grad_t


def _setup_context(ctx, inputs, output) -> None:
    student, teacher = inputs[0], inputs[1]
    _, grad_s, grad_t = output
    ctx.save_for_backward(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # the gradient outputs' incoming grads are unused: no zeros
    ctx.input_dtypes = (student.dtype, teacher.dtype)


def _scale_saved(grad_loss: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype, which: str):
    if saved.dim() != 2:
        raise RuntimeError(
            f"rkkd::kendall was called with need_grad_{which}=False, so it has no gradient to give; "
            "call it through rkkd_kernels.kendall_loss, which sets the flags from requires_grad"
        )
    return (grad_loss.to(saved.dtype).unsqueeze(-1) * saved).to(dtype)


def _backward(ctx, grad_loss, _grad_of_grad_s, _grad_of_grad_t):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # create_graph=True: the saved gradients carry no graph back to the inputs, so a second
        # derivative would come out silently wrong; refuse instead.
        raise RuntimeError("rkkd::kendall does not support double backward (create_graph=True)")
    grad_s, grad_t = ctx.saved_tensors
    ds = dt = None
    if grad_loss is None:  # no gradient reached the loss (grads are not materialized as zeros)
        return None, None, None, None, None, None
    if ctx.needs_input_grad[0]:
        ds = _scale_saved(grad_loss, grad_s, ctx.input_dtypes[0], "student")
    if ctx.needs_input_grad[1]:
        dt = _scale_saved(grad_loss, grad_t, ctx.input_dtypes[1], "teacher")
    return ds, dt, None, None, None, None


def register_autograd(op_name: str) -> None:
    """Give ``op_name`` (an op with SCHEMA) the shared backward: saved gradients times grad_output."""
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)


torch.library.register_fake("rkkd::kendall", kendall_fake, lib=_lib)
register_autograd("rkkd::kendall")


def needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def call_fused(
    op, student: torch.Tensor, teacher: torch.Tensor, k: float, hard_teacher: bool
) -> torch.Tensor:
    """Run a fused op on ``(rows, C)`` inputs and return the per-row loss (autograd attached)."""
    loss, _, _ = op(
        student.contiguous(),
        teacher.contiguous(),
        float(k),
        bool(hard_teacher),
        needs_grad(student),
        needs_grad(teacher),
    )
    return loss

