"""The fused op ``rkkd::kendall`` and the autograd and vmap rules that every fast backend shares.

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

That backward only multiplies, so it has no derivative of its own: a second derivative is refused
(only when one is actually taken; a first backward with ``create_graph=True`` works, as
``torch.func.grad`` needs). Rows are independent, so the batching rule of ``torch.func.vmap`` turns
a vmapped dimension into more rows: one call, no per-example loop. The contract of the public loss,
which these rules serve: docs/contract.md.

The schema is defined here, in Python, so that it exists whichever compiled parts are present; the
compiled libraries only register implementations for the CPU and CUDA dispatch keys, and the Triton
kernel registers its own op (``rkkd::kendall_triton``) with the same signature, autograd and vmap.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from .dtypes import accumulation_dtype

SCHEMA = (
    "(Tensor student, Tensor teacher, float k, bool hard_teacher, bool need_grad_student, "
    "bool need_grad_teacher) -> (Tensor, Tensor, Tensor)"
)

_lib = torch.library.Library("rkkd", "FRAGMENT")
_lib.define("kendall" + SCHEMA)
# Private, for the tests: makes the CPU library run one ISA variant (process-wide) and returns the
# one it replaces (csrc/cpu_library.cpp; _ext.forced_cpu_variant wraps it).
_lib.define("_force_cpu_variant(str variant) -> str")


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
    ctx.input_dtypes = (student.dtype, teacher.dtype)
    # An output that nothing downstream used gets None, not zeros: how _backward tells the first
    # derivative (only the loss has a gradient) from a second one (a returned gradient has one).
    ctx.set_materialize_grads(False)


def _scale_saved(grad_loss: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype, which: str):
    if saved.dim() != 2:
        raise RuntimeError(
            f"rkkd::kendall was called with need_grad_{which}=False, so it has no gradient to give; "
            "call it through rkkd_kernels.kendall_loss, which sets the flags from requires_grad"
        )
    return (grad_loss.to(saved.dtype).unsqueeze(-1) * saved).to(dtype)


def _backward(ctx, grad_loss, grad_of_grad_s, grad_of_grad_t):
    second = grad_of_grad_s is not None or grad_of_grad_t is not None
    if second and not torch.compiler.is_compiling():
        # The saved gradients are outputs of the op, so a first backward run with create_graph=True
        # (as torch.func.grad always runs it) links its result to them, and differentiating that
        # result lands here. The op has no kernel for the second derivative: refuse, as
        # torch.autograd.function.once_differentiable does, rather than return a wrong one.
        # (torch.compile traces the backward with a gradient for every output; a compiled
        # backward is never differentiated again, AOTAutograd refuses that itself.)
        raise RuntimeError(
            "rkkd::kendall does not support double backward: its backward multiplies the first "
            "derivatives that the forward computed, and they have no derivative of their own here"
        )
    grad_s, grad_t = ctx.saved_tensors
    ds = dt = None
    if grad_loss is not None and ctx.needs_input_grad[0]:
        ds = _scale_saved(grad_loss, grad_s, ctx.input_dtypes[0], "student")
    if grad_loss is not None and ctx.needs_input_grad[1]:
        dt = _scale_saved(grad_loss, grad_t, ctx.input_dtypes[1], "teacher")
    return ds, dt, None, None, None, None


def _batching_rule(op: Callable) -> Callable:
    """The vmap rule of ``op`` (or of anything called as the op is): rows are independent, so a
    vmapped dimension is more rows.

    Each input's vmapped dimension moves to the front (an input vmap does not map over is expanded
    to the batch, a view); ``(batch, rows, C)`` flattens to ``(batch * rows, C)`` and one call of
    the op serves the whole batch. No per-example loop, so no fallback.
    """

    def rule(info, in_dims, student, teacher, k, hard_teacher, need_grad_student, need_grad_teacher):
        def batch_first(x: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
            return x.movedim(dim, 0) if dim is not None else x.expand(info.batch_size, *x.shape)

        student, teacher = batch_first(student, in_dims[0]), batch_first(teacher, in_dims[1])
        if student.dim() != 3:
            raise RuntimeError(f"{op} expects (rows, C) inputs, got {tuple(student.shape[1:])} under vmap")
        batch, rows, c = student.shape
        loss, grad_s, grad_t = op(
            student.reshape(batch * rows, c).contiguous(),
            teacher.reshape(batch * rows, -1).contiguous(),
            k, hard_teacher, need_grad_student, need_grad_teacher,
        )

        def unflatten(grad: torch.Tensor, needed: bool):  # an empty (0,) gradient stays unbatched
            return (grad.reshape(batch, rows, c), 0) if needed else (grad, None)

        (grad_s, dim_s) = unflatten(grad_s, need_grad_student)
        (grad_t, dim_t) = unflatten(grad_t, need_grad_teacher)
        return (loss.reshape(batch, rows), grad_s, grad_t), (0, dim_s, dim_t)

    return rule


class _Kendall(torch.autograd.Function):
    """The op's autograd as a ``torch.autograd.Function`` that ``torch.func`` can transform.

    ``torch.library.register_autograd`` builds an autograd.Function without a ``setup_context``
    staticmethod, which ``torch.func.grad`` and ``vjp`` refuse (a limitation of torch itself). Under
    torch.func transforms ``call_fused`` therefore applies this class, which runs the same
    ``_setup_context`` and ``_backward``. Its vmap rule is the op's, around this class: the batched
    inputs become more rows of one ``apply``, so a gradient taken through the vmap is this class's
    plain backward. (torch's generated rule would do too on newer torch, but torch 2.6 fails in it
    when some of the outputs get no gradient, as the gradients outputs here never do.)
    """

    @staticmethod
    def forward(student, teacher, k, hard_teacher, need_grad_student, need_grad_teacher, op):
        return op(student, teacher, k, hard_teacher, need_grad_student, need_grad_teacher)

    @staticmethod
    def vmap(info, in_dims, student, teacher, k, hard_teacher, need_grad_student,
             need_grad_teacher, op):
        rule = _batching_rule(lambda *args: _Kendall.apply(*args, op))
        return rule(info, in_dims[:6], student, teacher, k, hard_teacher, need_grad_student,
                    need_grad_teacher)

    # The op's arguments come first, in the schema's order, so that the shared functions see the
    # same inputs and needs_input_grad as under the op's own autograd; the op itself comes last.
    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, grad_loss, grad_of_grad_s, grad_of_grad_t):
        return (*_backward(ctx, grad_loss, grad_of_grad_s, grad_of_grad_t), None)


def register_autograd_and_vmap(op_name: str) -> None:
    """Give ``op_name`` (an op with SCHEMA) the shared backward (saved gradients times grad_output)
    and the shared batching rule."""
    torch.library.register_autograd(op_name, _backward, setup_context=_setup_context)
    namespace, name = op_name.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    torch.library.register_vmap(op_name, _batching_rule(op))


torch.library.register_fake("rkkd::kendall", kendall_fake, lib=_lib)
register_autograd_and_vmap("rkkd::kendall")


def needs_grad(x: torch.Tensor) -> bool:
    """Whether a gradient with respect to ``x`` may be asked for (by autograd or torch.func.grad)."""
    if not torch.is_grad_enabled():
        return False
    if x.requires_grad:
        return True
    # A tensor that vmap batched reports requires_grad=False even where the tensor it wraps is
    # tracked (by autograd outside the vmap, or by an enclosing torch.func.grad): look through it.
    # torch.compile cannot trace that look, so a compiled transform asks for the gradient anyway.
    if torch.compiler.is_compiling():
        return torch._C._are_functorch_transforms_active()
    while torch._C._functorch.is_batchedtensor(x):
        x = torch._C._functorch.get_unwrapped(x)
    return x.requires_grad


def call_fused(
    op, student: torch.Tensor, teacher: torch.Tensor, k: float, hard_teacher: bool
) -> torch.Tensor:
    """Run a fused op on ``(rows, C)`` inputs and return the per-row loss (autograd attached)."""
    args = (
        student.contiguous(),
        teacher.contiguous(),
        float(k),
        bool(hard_teacher),
        needs_grad(student),
        needs_grad(teacher),
    )
    if torch._C._are_functorch_transforms_active():
        loss, _, _ = _Kendall.apply(*args, op)
    else:
        # The op's own autograd: the same functions, without the ~0.1 ms that each apply of a
        # Function with setup_context spends binding its arguments (inspect.signature).
        loss, _, _ = op(*args)
    return loss
