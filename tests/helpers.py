"""What the kernel tests share: the tolerances, the input maker, the float64 truth and the check
against it (test_kendall.py, test_triton.py, test_cuda_ext.py, test_func.py), and the contract's
per-row precision (test_precision.py, test_hazards.py, test_expsum.py).

Tolerances (float32 computation against the float64 truth):
- loss: each pair term tanh * w is computed to a few float32 ulps of 1 (~1e-7 absolute, |term| <= 1),
  and the mean over P pairs of such errors stays below 1e-6: LOSS_ATOL = 2e-6 on a value in [0, 2];
- gradients: the fast kernels compute a pair's tanh to absolute (not relative) float32 precision:
  the ratio form (a_i - a_j) / (a_i + a_j) with a = exp(2k x) rounds each a to a relative 6e-8. So
  an entry, 4k/P times a sum of C - 1 such terms, is accurate to about 1e-7 of the largest value an
  entry can take, 2k/C (each term is at most 1/4), even when every pair of a row is nearly tied and
  the true gradient is far smaller. We allow 1e-5 of 2k/C (GRAD_RTOL); measured errors are 100x less.
  On a GPU, exp2 and rcp.approx add 1-2 ulps to each term, well inside that.
float64 inputs are computed in float64 and held to 1e-12 (loss) and 1e-10 of 2k/C.
"""

from __future__ import annotations

import torch

from rkkd_kernels import kendall_loss

LOSS_ATOL = {torch.float32: 2e-6, torch.float64: 1e-12}
GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def grad_atol(dtype: torch.dtype, k: float, c: int) -> float:
    """The absolute tolerance of a gradient entry: GRAD_RTOL of its scale 2k/C."""
    return GRAD_RTOL[dtype] * 2 * k / c


def make_logits(shape, dtype=torch.float64, scale=3.0, seed=0, device="cpu"):
    """Normal logits of standard deviation ``scale``, drawn in float64 on the CPU (the same values
    on every device), then rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)


def loss_and_grads(student, teacher, backend, **kw):
    """Per-row loss (reduction none) and the gradients of its sum, from fresh leaf copies."""
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    loss = kendall_loss(s, t, reduction="none", backend=backend, **kw)
    gs, gt = torch.autograd.grad(loss.sum(), (s, t))
    return loss.detach(), gs, gt


def truth(student, teacher, **kw):
    """The float64 ground truth: the reference backend on float64 copies (moved to the CPU)."""
    return loss_and_grads(student.cpu().double(), teacher.cpu().double(), "reference", **kw)


def assert_matches(actual, expected, dtype, k=1.0):
    """Loss and both gradients against the truth; gradients relative to their scale 2k/C.

    A gradient given as None in ``actual`` (not asked for) is not compared.
    """
    loss, gs, gt = (None if x is None else x.detach().cpu().double() for x in actual)
    loss_t, gs_t, gt_t = expected
    torch.testing.assert_close(loss, loss_t, atol=LOSS_ATOL[dtype], rtol=0)
    atol = grad_atol(dtype, k, gs_t.shape[-1])
    for got, want in ((gs, gs_t), (gt, gt_t)):
        if got is not None:
            torch.testing.assert_close(got, want, atol=atol, rtol=0)


# The contract's precision (docs/contract.md, "Precision"), per row: the loss absolute, each gradient
# relative to the largest |gradient| of its row. Stricter than the 2k/C scale above where a row's
# gradients are far below 2k/C (small k * spread, a student close to its teacher).
ROW_LOSS_ATOL = {torch.float32: 1e-6, torch.float64: 1e-12}
ROW_GRAD_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def row_relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """max |got - want| of each row over the row's largest |want| (an all-zero row: absolute)."""
    scale = want.abs().amax(-1)
    err = (got - want).abs().amax(-1)
    return torch.where(scale > 0, err / scale.clamp_min(1e-300), err)


def assert_row_precise(actual, expected, dtype, loss_atol=None, what=""):
    """Loss and gradients against the truth at the contract's per-row precision (``loss_atol``
    overrides the loss's); a gradient given as None in ``actual`` is not compared."""
    loss, gs, gt = (None if x is None else x.detach().cpu().double() for x in actual)
    loss_t, gs_t, gt_t = (x.detach().cpu().double() for x in expected)
    atol = ROW_LOSS_ATOL[dtype] if loss_atol is None else loss_atol
    torch.testing.assert_close(loss, loss_t, atol=atol, rtol=0)
    for name, got, want in (("student", gs, gs_t), ("teacher", gt, gt_t)):
        if got is None:
            continue
        err = row_relative_error(got, want)
        assert (err <= ROW_GRAD_RTOL[dtype]).all(), (
            f"{name} gradient{what}: row errors {err.tolist()} of the row's largest |gradient|, "
            f"tolerance {ROW_GRAD_RTOL[dtype]}"
        )
