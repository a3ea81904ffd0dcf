"""The Triton backend of the exponential-sum method: op ``rkkd::kendall_expsum_triton``.

The method, its lattice and its error bounds are in ``expsum.py``; this is its GPU form (tested here
under the Triton interpreter only: no GPU was available when it was written, so neither its speed
nor its compiled form has been measured).

The host part is made of device-side torch ops (no synchronisation): the stable sort of each row by
teacher logit (descending), the student in that order as b = 2k (s - centre) in float64, the flags
that mark the first element of each tie group in both directions, the untied-pair count and the
node range per row (from the lattice of ``expsum.py``), and each row's kind (exponential sums,
non-finite, or beyond the lattice's spread: the pair path).

The kernel runs one program per row. For each chunk of BLOCK_M nodes it scans the row twice, in
tiles of BLOCK_C elements x BLOCK_M nodes: forward for the prefix part of the gradient, backward
(the same scan on the reversed row) for the loss and the suffix part. Within a tile, the sum over
the groups strictly before an element is the exclusive prefix sum (a product with a strictly lower
triangular matrix of ones: no subtraction) taken at its group's first element: with every term
positive the prefix sums only grow, so that value is the running
maximum over the tile of the sums at group starts (``tl.associative_scan`` with max), and a group
begun in an earlier tile carries its value over. All sums are float64 (for float32 inputs too: a
blocked float32 variant is left for when it can be measured on a GPU). A row beyond the lattice's
spread takes the pair kernel's tile loop (``triton_pairs.tile_row``) in its direct form, in the same
program, in float64.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import expsum
from .checks import check_op_inputs
from .dtypes import accumulation_dtype
from .triton_pair_math import FORM_DIRECT, from_halves
from .triton_pairs import tile_row
from .triton_runtime import INTERPRETING, MAX_GRID_ROWS, float32_halves, launcher, register_op

OP_NAME = "rkkd::kendall_expsum_triton"

KIND_EXPSUM, KIND_NON_FINITE, KIND_PAIRS = 0, 1, 2


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _scan(b_row, first_row, g_row, C, t_nodes, valid_m,
          REVERSE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """One pass along the row (reversed when REVERSE) for one chunk of nodes.

    g_row[x] gets - sum_m F prefF (forward) or + sum_m F sufF (REVERSE); returns the loss part
    sum_m sum_x E sufF (REVERSE; 0 forward).
    """
    carry_total = tl.zeros([BLOCK_M], tl.float64)
    carry_group = tl.zeros([BLOCK_M], tl.float64)
    lanes = tl.arange(0, BLOCK_C)
    strictly_lower = tl.where(lanes[:, None] > lanes[None, :], 1.0, 0.0).to(tl.float64)
    loss = tl.sum(carry_total, axis=0)
    for c0 in range(0, C, BLOCK_C):
        pos = c0 + tl.arange(0, BLOCK_C)
        inside = pos < C
        if REVERSE:
            idx = C - 1 - pos
        else:
            idx = pos
        b = tl.load(b_row + idx, mask=inside, other=0.0)
        first = tl.load(first_row + idx, mask=inside, other=1)
        live = inside[:, None] & valid_m[None, :]
        y = tl.exp(tl.minimum(t_nodes[None, :] + b[:, None], 700.0))
        e = tl.exp(-y)
        f = tl.where(live, y * e, 0.0)
        e = tl.where(live, e, 0.0)
        # The sum over the tile's earlier elements, as a product with a strictly lower triangular
        # matrix of ones: sums of positive terms only (an inclusive cumsum minus the element itself
        # would cancel where one F dwarfs the sum before it, as in saturated rows).
        excl = carry_total[None, :] + tl.dot(strictly_lower, f)
        at_start = tl.where(first[:, None] != 0, excl, 0.0)
        before = tl.maximum(tl.associative_scan(at_start, 0, _max_combine), carry_group[None, :])
        dot = tl.sum(f * before, axis=1)
        old = tl.load(g_row + idx, mask=inside, other=0.0)
        if REVERSE:
            tl.store(g_row + idx, old + dot, mask=inside)
            loss += tl.sum(tl.sum(e * before, axis=1), axis=0)
        else:
            tl.store(g_row + idx, old - dot, mask=inside)
        carry_total += tl.sum(f, axis=0)
        carry_group = tl.max(tl.where(inside[:, None], before, 0.0), axis=0)
    return loss


@triton.jit
def _pair_row(b_row, t_row, g_row, C, log2e, NEED_GRAD: tl.constexpr, BLOCK_C: tl.constexpr):
    """The guarded path: the pair kernel's tiles in the direct form, in float64, on b = 2k (s - c),
    where 1 stands for 2k and log2(e) for 2k / ln 2; g_row (zeros) gets the sums G of
    csrc/pair_math.h. Returns P * tau."""
    one = tl.sum(tl.full([1], 1.0, tl.float64), axis=0)
    tau = tl.sum(tl.zeros([1], tl.float64), axis=0)
    for ti in range(0, tl.cdiv(C, BLOCK_C)):
        tau += tile_row(b_row, t_row, g_row, g_row, ti, C, one, log2e, tl.float64, True, NEED_GRAD,
                        False, FORM_DIRECT, False, BLOCK_C)
    return tau


@triton.jit
def _expsum_kernel(b_ptr, t_ptr, first_ptr, last_ptr, m_lo_ptr, count_ptr, kind_ptr, tied_ptr,
                   loss_ptr, g_ptr, C, step, log2e_hi, log2e_lo,
                   NEED_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b_row = b_ptr + row * C
    g_row = g_ptr + row * C
    kind = tl.load(kind_ptr + row)
    c_f = tl.sum(tl.zeros([1], tl.float64) + C, axis=0)
    pairs = c_f * (c_f - 1.0) * 0.5
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        tl.store(g_row + cols, tl.zeros([BLOCK_C], tl.float64), mask=cols < C)
    if kind == 0:
        m_lo = tl.load(m_lo_ptr + row)
        count = tl.load(count_ptr + row)
        loss_sum = tl.sum(tl.zeros([1], tl.float64), axis=0)
        for mc in range(0, count, BLOCK_M):
            j = mc + tl.arange(0, BLOCK_M)
            t_nodes = (m_lo + j).to(tl.float64) * step
            valid_m = j < count
            if NEED_GRAD:
                _scan(b_row, first_ptr + row * C, g_row, C, t_nodes, valid_m, False, BLOCK_C, BLOCK_M)
            loss_sum += _scan(b_row, last_ptr + row * C, g_row, C, t_nodes, valid_m, True, BLOCK_C, BLOCK_M)
        tied = tl.load(tied_ptr + row)
        tl.store(loss_ptr + row, (tied + 2.0 * step * loss_sum) / pairs)
        scale = -4.0 * step / pairs
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            g = tl.load(g_row + cols, mask=cols < C, other=0.0)
            tl.store(g_row + cols, g * scale, mask=cols < C)
    elif kind == 2:
        log2e = from_halves(log2e_hi, log2e_lo, tl.float64)
        tau = _pair_row(b_row, t_ptr + row * C, g_row, C, log2e, NEED_GRAD, BLOCK_C)
        tl.store(loss_ptr + row, 1.0 - tau / pairs)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            g = tl.load(g_row + cols, mask=cols < C, other=0.0)
            tl.store(g_row + cols, -4.0 * g / pairs, mask=cols < C)
    else:
        tl.store(loss_ptr + row, float("nan"))
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            tl.store(g_row + cols, tl.full([BLOCK_C], float("nan"), tl.float64), mask=cols < C)


def _kendall_expsum_triton(student: torch.Tensor, teacher: torch.Tensor, k: float, hard_teacher: bool,
                           need_grad_student: bool, need_grad_teacher: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op contract of ``ops.py`` for the hard teacher, by exponential sums (see the module)."""
    check_op_inputs(OP_NAME, student, teacher, k, max_rows=MAX_GRID_ROWS)
    if not hard_teacher:
        raise RuntimeError(f"{OP_NAME} computes the hard-teacher loss only (hard_teacher=True)")
    rows, c = student.shape
    acc = accumulation_dtype(student.dtype)
    lat = expsum.lattice(student.dtype)
    s = student.to(torch.float64)
    t = teacher.to(torch.float64)
    t_sorted, order = torch.sort(t + 0.0, dim=1, descending=True, stable=True)  # -0 and +0 tie
    s_sorted = s.gather(1, order)
    lo, hi = torch.aminmax(s, dim=1)
    finite = torch.isfinite(s).all(1) & torch.isfinite(t).all(1)
    spread = k * (hi - lo)
    kind = torch.where(finite, torch.where(spread <= lat.max_spread, KIND_EXPSUM, KIND_PAIRS), KIND_NON_FINITE)
    centre = torch.where(finite, 0.5 * hi + 0.5 * lo, 0.0)
    b = (2.0 * k * (s_sorted - centre[:, None])).contiguous()
    spread = torch.where(kind == KIND_EXPSUM, spread, 0.0)
    m_lo = torch.floor((lat.lead - spread) / lat.step) + 1
    m_hi = torch.ceil((lat.tail + spread) / lat.step) - 1
    count = torch.where(kind == KIND_EXPSUM, m_hi - m_lo + 1, 0.0).to(torch.int32)
    differs = t_sorted[:, 1:] != t_sorted[:, :-1]
    ones = torch.ones((rows, 1), dtype=torch.bool, device=s.device)
    first = torch.cat([ones, differs], 1).to(torch.int8).contiguous()  # first of its group, forward
    last = torch.cat([differs, ones], 1).to(torch.int8).contiguous()  # first of its group, reversed
    group = torch.cumsum(first.to(torch.int64), 1) - 1
    sizes = torch.zeros((rows, c), dtype=torch.int64, device=s.device).scatter_add_(1, group, torch.ones_like(group))
    tied = (sizes * (sizes - 1) // 2).sum(1).to(torch.float64)
    loss = torch.empty((rows,), dtype=torch.float64, device=s.device)
    g_sorted = torch.empty((rows, c), dtype=torch.float64, device=s.device)
    if rows > 0:
        block_c = 16 if INTERPRETING and c <= 64 else 64
        launcher(_expsum_kernel)[(rows,)](
            b, t_sorted.contiguous(), first, last, m_lo.to(torch.int32).contiguous(), count.contiguous(),
            kind.to(torch.int32).contiguous(), tied, loss, g_sorted, c, float(lat.step),
            *float32_halves(1.0 / math.log(2.0)),
            NEED_GRAD=bool(need_grad_student), BLOCK_C=block_c, BLOCK_M=32,
        )
        # The kernel writes the gradient over k: a float scalar argument reaches a GPU kernel as
        # float32, which would cost a float64 result its last 29 bits (the lattice step, a dyadic
        # rational, passes exactly). k multiplies here, in float64.
        g_sorted.mul_(k)
    empty = student.new_empty((0,), dtype=acc)
    grad_s = torch.zeros_like(g_sorted).scatter_(1, order, g_sorted).to(acc) if need_grad_student else empty
    grad_t = student.new_zeros((rows, c), dtype=acc) if need_grad_teacher else student.new_empty((0,), dtype=acc)
    return loss.to(acc), grad_s, grad_t


kendall_expsum_triton = register_op(OP_NAME, _kendall_expsum_triton)
