"""The Triton backend: op ``rkkd::kendall_triton``, the loss and both gradients in one pass.

Importing this module registers ``rkkd::kendall_triton`` (schema ``ops.SCHEMA``, autograd and vmap
``ops.register_autograd_and_vmap``); an ImportError (no Triton) tells ``backends`` that Triton is absent.

Design
------
*Forward writes the gradients* (not "backward recomputes"). The pass that sums tau already forms
tanh of every student and teacher pair, and the two gradient terms reuse exactly those values, so
writing them costs a few multiply-adds per pair; recomputing them in a backward kernel would visit
all C^2 / 2 pairs a second time. What is stored for the backward is only O(rows * C) (the gradients
themselves), and the backward is the shared multiplication by grad_output of ``ops.py``.

*Work split.* A row's pairs are cut into square BLOCK x BLOCK tiles; only tiles (ti, tj) with
tj >= ti are visited, and inside the diagonal tile only j > i, so each unordered pair is visited
once. Program (row, split) takes whole tile-rows ti (its i-tiles, given out to the row's splits in
snake order so that long and short tile-rows balance) and streams their tiles tj = ti .. T-1:

- the i-side sums (tau, d/ds_i, d/dt_i of the tile-row) build up in BLOCK x BLOCK register tiles
  (adds only) and are reduced once per tile-row;
- the j-side sums (each pair's term is subtracted from j) are reduced over the tile's i and added,
  tile by tile, into a partial gradient row that belongs to this program alone (read-modify-write
  between block barriers). No atomics: one program owns each partial row and updates it in a fixed
  order, so results are bitwise reproducible (see _autotune_options for the tile choice).

Usually there is one split per row (rows >= number of SMs); the partial row is then the output row
itself and the same program scales it at the end (one launch). With few rows, each row gets up to
MAX_SPLITS splits so that every SM has work; splits > 0 write scratch rows, and a second kernel
adds the partial rows in split order (a fixed-order two-stage reduction) and scales them. The
scratch holds (splits - 1) * rows < SMs rows of C; each program also keeps two rows of C, its
student's and teacher's weights (below), 2 * rows * splits rows in all: extra memory stays
O(rows * C).

*tanh of a pair, exactly for every spread.* Per row, with centre c = (max + min) / 2 and
a_i = exp(2k (x_i - c)) (one exp per element and program, not per pair or tile: each program
writes its row's weights into its own weight rows once, and the tile loop loads them):

    tanh(k (x_i - x_j)) = p - q,   (1 - tanh^2) / 4 = p * q,   p = a_i / (a_i + a_j), q = a_j / (a_i + a_j)

One division per pair and tensor, no cancellation where tanh saturates (p * q stays accurate where
1 - tanh^2 would round to 0). It has no overflow while k * (max - min) <= 80 (float32) or 700
(float64), where every a_i is a normal number and a_i + a_j cannot overflow. Its tanh is exact to
ulps of 1, though, not of tanh: rows of k * (max - min) <= 1 take the small-spread form instead,
e_i = expm1(2k (x_i - c)) and tanh = (e_i - e_j) / (e_i + e_j + 2), exact relative to the row's
largest tanh for any k > 0 (expm1 is a series here: Triton has no expm1). Rows beyond the ratio form
take the direct form, tanh(d) = sign(d) (1 - e) / (1 + e) with e = exp(-2|d|) in (0, 1], which
cannot overflow either; the choice is one uniform branch per row, taken inside the kernel (no host
sync): the rule of choose_row_path in csrc/pair_math.h (see _row_form). The ratio form is also what
makes the GPU fast:
one reciprocal per pair and tensor (rcp.approx.ftz.f32, 1 ulp, for float32 on the GPU), and one
exp2 per element and program, with 2k / ln 2 folded into a per-row scale; no libdevice tanh, and
none of tanh.approx's 2^-11 error. The interpreter, which has no libdevice, runs the same code with an
exact division. Interior tiles skip the per-pair mask and the bounds tests of their loads and
stores; only diagonal and last tiles carry them.

Under TRITON_INTERPRET=1 the op is an opaque ``custom_op`` (fake tensors cannot run interpreted
kernels); on the GPU it is a ``triton_op``, so torch.compile sees the kernels.

Rows holding a non-finite logit skip the pair loop and get NaN loss and gradients (a hard teacher's
zero gradient stays zero).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import struct
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import ops
from .dtypes import accumulation_dtype

if not hasattr(torch.library, "triton_op"):  # backends reads an ImportError as "Triton absent"
    raise ImportError(
        f"the Triton backend needs torch >= 2.6 (torch.library.triton_op); torch is {torch.__version__}"
    )

OP_NAME = "rkkd::kendall_triton"

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Largest k * (max - min) of a row that the ratio form serves exactly (see csrc/pair_math.h).
RATIO_MAX_SPREAD = {torch.float32: 80.0, torch.float64: 700.0}
# Largest k * (max - min) of a row that takes the small-spread form (kSmallSpreadMax there).
SMALL_SPREAD_MAX = 1.0

# How a row's pairs are computed (constexpr FORM of the pair functions).
FORM_SMALL: tl.constexpr = tl.constexpr(0)  # e = expm1(2k (x - centre)), tanh from e_i, e_j
FORM_RATIO: tl.constexpr = tl.constexpr(1)  # a = exp(2k (x - centre)), tanh from a_i, a_j
FORM_DIRECT: tl.constexpr = tl.constexpr(2)  # the logits themselves, tanh of each difference

# At most this many programs share one row (the finalize kernel adds their partial rows).
MAX_SPLITS = 64
# A split gets at least this many columns (two or more tile-rows), or the split's fixed costs (row
# range, zeroing its partial row) would outweigh its share of the pairs.
MIN_COLUMNS_PER_SPLIT = 16 if INTERPRETING else 128
# The interpreter has no SMs; this stands in so that small test inputs exercise multi-split rows.
INTERPRETER_PROGRAMS = 4

FINALIZE_BLOCK = 16 if INTERPRETING else 1024
# The most rows one call takes: the pair kernel's grid puts rows on axis 0 (at most 2^31 - 1).
MAX_ROWS = 2**31 - 1
# The k range: k arrives as two float32 halves (see _float32_halves), whose low half must stay a
# normal float32 (k * 2^-24 >= 2^-126) for ~48 bits of k; below float32's range k would be 0.
MIN_K = 2.0**-100
MAX_K = 1.0e38


# ----------------------------------------------------------------------------------------------
# Pair math (the Triton copy of csrc/pair_math.h)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _reciprocal(x, FAST_RCP: tl.constexpr):
    """1 / x; FAST_RCP (GPU, float32): one MUFU rcp.approx (1 ulp), not div.full's range fix-ups.

    The ratio form only takes reciprocals of a_i + a_j in [2 exp(-80), 2 exp(80)], normal numbers
    far from rcp.approx's denormal and overflow edges.
    """
    if FAST_RCP:
        r = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        r = 1.0 / x
    return r


@triton.jit
def _tanh_pair(u_i, u_j, two_k, exp2_scale, FORM: tl.constexpr, FAST_RCP: tl.constexpr):
    """tanh(k (x_i - x_j)) and (1 - tanh^2) / 4 of a tile of pairs; two_k = 2k, exp2_scale = 2k / ln 2.

    u are the weights of _weights: expm1 (FORM_SMALL), exp (FORM_RATIO) or the logits (FORM_DIRECT).
    """
    if FORM == FORM_SMALL:
        # |tanh| <= tanh(1) on these rows: 1 - tanh^2 >= 0.41, no cancellation.
        inv = _reciprocal(u_i + u_j + 2.0, FAST_RCP)
        th = (u_i - u_j) * inv
        quarter_sech2 = 0.25 - 0.25 * th * th
    elif FORM == FORM_RATIO:
        inv = _reciprocal(u_i + u_j, FAST_RCP)
        p = u_i * inv
        q = u_j * inv
        th = p - q
        quarter_sech2 = p * q
    else:
        # tanh|z| = -m / (2 + m), m = expm1(-2|z|), exact for small |z| too (1 - exp(-2|z|) would
        # cancel there); (1 - tanh^2) / 4 = e / (1 + e)^2 with e = exp(-2|z|) in (0, 1], which
        # does not overflow, and is 0 where tanh saturates.
        d = u_i - u_j
        e = tl.exp2(-exp2_scale * tl.abs(d))
        m = _expm1(-two_k * tl.abs(d))
        inv = 1.0 / (1.0 + e)
        th = -m * inv
        th = tl.where(d < 0, -th, th)
        quarter_sech2 = e * inv * inv
    return th, quarter_sech2


@triton.jit
def _sign(x):
    """sign(x) with sign(0) = 0, in x's dtype: the hard teacher's weight."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


@triton.jit
def _load_weights(w_row, offs, C, MASKED: tl.constexpr):
    """A tile of a program's weight row (see _store_weights); lanes past C hold 1, a finite weight
    of every form (their pairs are masked out).

    MASKED False: the caller knows every lane is below C (an interior tile), so no compare per lane.
    """
    if MASKED:
        u = tl.load(w_row + offs, mask=offs < C, other=1.0)
    else:
        u = tl.load(w_row + offs)
    return u


@triton.jit
def _expm1(x):
    """expm1(x) to a few ulps in float32 and float64: Triton has no expm1, the interpreter no
    libdevice.

    |x| < 1/2: the Taylor series x (1 + x/2 (1 + x/3 (1 + ... (1 + x/N)))), whose remainder is
    below 0.5^N / (N + 1)! of x: N = 8 for float32 (1e-8), 14 for float64 (5e-17). The factors 1/n
    are divisions of a 1 in x's dtype, one per tile (a float literal 1/n would be rounded to float32
    even for float64). Elsewhere exp(x) - 1, where the subtraction costs at most a bit or two.
    """
    small = tl.abs(x) < 0.5
    one = tl.sum(tl.full([1], 1.0, x.dtype), axis=0)
    r = x * 0.0 + 1.0
    if x.dtype == tl.float64:
        for n in tl.static_range(14, 1, -1):
            r = 1.0 + x * r * (one / n)
    else:
        for n in tl.static_range(8, 1, -1):
            r = 1.0 + x * r * (one / n)
    return tl.where(small, x * r, tl.exp(x) - 1.0)


@triton.jit
def _weights(x, centre, two_k, exp2_scale, FORM: tl.constexpr):
    """The weights of _tanh_pair: expm1(2k (x - centre)), exp(2k (x - centre)) or x itself.

    exp2 with 2k / ln 2 folded into one per-row scale: one rounding fewer than exp's own x * log2 e.
    """
    if FORM == FORM_SMALL:
        u = _expm1(two_k * (x - centre))
    elif FORM == FORM_RATIO:
        u = tl.exp2(exp2_scale * (x - centre))
    else:
        u = x
    return u


@triton.jit
def _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                   ACC: tl.constexpr, HARD: tl.constexpr, FORM: tl.constexpr, BLOCK: tl.constexpr):
    """The weights of _weights of both rows (a hard teacher: its logits), once per program, into its
    own weight rows: the tile loop loads them instead of taking an exp of each tile's j side for
    every tile-row (and in every warp that holds the tile's j side)."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        inside = cols < C
        us = _weights(tl.load(s_row + cols, mask=inside, other=0.0).to(ACC), s_centre, two_k,
                      exp2_scale, FORM)
        tl.store(ws_row + cols, us, mask=inside)
        ut = tl.load(t_row + cols, mask=inside, other=0.0).to(ACC)
        if not HARD:
            ut = _weights(ut, t_centre, two_k, exp2_scale, FORM)
        tl.store(wt_row + cols, ut, mask=inside)


@triton.jit
def _row_form(spread, ratio_limit):
    """FORM of a row of finite logits from k * max(spread of student, of teacher): the rule of
    choose_row_path in csrc/pair_math.h, less its double ratio form (a float32 row beyond the float
    ratio form takes the direct form here, in float32, which cannot overflow)."""
    return tl.where(spread <= 1.0, FORM_SMALL,  # 1.0: SMALL_SPREAD_MAX
                    tl.where(spread <= ratio_limit, FORM_RATIO, FORM_DIRECT))


@triton.jit
def _add_into(row_ptr, offs, C, delta, MASKED: tl.constexpr):
    """row[offs] += delta on this program's own partial row (MASKED False: every offs is below C).

    Several threads may load and store one element (replicated layouts), and warps drift apart: the
    first barrier makes every earlier store visible before anyone reads, the second makes every
    read happen before anyone writes. Barriers are no-ops under the interpreter.
    """
    tl.debug_barrier()
    if MASKED:
        inside = offs < C
        old = tl.load(row_ptr + offs, mask=inside, other=0.0)
        tl.debug_barrier()
        tl.store(row_ptr + offs, old + delta, mask=inside)
    else:
        old = tl.load(row_ptr + offs)
        tl.debug_barrier()
        tl.store(row_ptr + offs, old + delta)


@triton.jit
def _row_range(row_ptr, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """(min, max, any non-finite) of one row, over its finite entries."""
    offs = tl.arange(0, BLOCK)
    lo = tl.full([BLOCK], float("inf"), ACC)
    hi = tl.full([BLOCK], float("-inf"), ACC)
    n_bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, C, BLOCK):
        cols = start + offs
        inside = cols < C
        x = tl.load(row_ptr + cols, mask=inside, other=0.0).to(ACC)
        finite = tl.abs(x) < float("inf")  # False for NaN and for +-inf
        n_bad += tl.where(inside & (finite == 0), 1, 0)
        lo = tl.minimum(lo, tl.where(inside & finite, x, float("inf")))
        hi = tl.maximum(hi, tl.where(inside & finite, x, float("-inf")))
    return tl.min(lo, axis=0), tl.max(hi, axis=0), tl.sum(n_bad, axis=0) > 0


@triton.jit
def _tile_pair(
    us_i, ut_i, cols_i, tj, tau_acc, gs_acc, gt_acc,
    ws_row, wt_row, gs_row, gt_row, C, two_k, exp2_scale,
    HARD: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
    FORM: tl.constexpr, MASKED: tl.constexpr, FAST_RCP: tl.constexpr, BLOCK: tl.constexpr,
):
    """One tile (ti, tj) of pairs: i-side terms into the register tiles, j-side into the row.

    MASKED (the diagonal tile and the last, partial one): only pairs j > i, j < C count. Interior
    tiles skip the per-pair mask.
    """
    cols_j = tj * BLOCK + tl.arange(0, BLOCK)
    us_j = _load_weights(ws_row, cols_j, C, MASKED)
    ut_j = _load_weights(wt_row, cols_j, C, MASKED)
    th_s, qs_s = _tanh_pair(us_i[:, None], us_j[None, :], two_k, exp2_scale, FORM, FAST_RCP)
    if HARD:
        w = _sign(ut_i[:, None] - ut_j[None, :])
        qs_t = w  # unused: a hard teacher has no gradient
    else:
        w, qs_t = _tanh_pair(ut_i[:, None], ut_j[None, :], two_k, exp2_scale, FORM, FAST_RCP)
    if MASKED:
        # j > i also drops every lane past C on the i side (j < C <= i there).
        valid = (cols_j[None, :] > cols_i[:, None]) & (cols_j[None, :] < C)
        w = tl.where(valid, w, 0.0)
        qs_t = tl.where(valid, qs_t, 0.0)
    tau_acc += th_s * w
    if NEED_GS:
        term = qs_s * w
        gs_acc += term
        _add_into(gs_row, cols_j, C, -tl.sum(term, axis=0), MASKED)
    if NEED_GT:
        term = th_s * qs_t
        gt_acc += term
        _add_into(gt_row, cols_j, C, -tl.sum(term, axis=0), MASKED)
    return tau_acc, gs_acc, gt_acc


@triton.jit
def _tile_row(
    ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
    ACC: tl.constexpr, HARD: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
    FORM: tl.constexpr, FAST_RCP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Tiles (ti, tj), tj = ti .. n_tiles-1, of one row; returns their share of P * tau.

    The i-side sums build up in BLOCK x BLOCK register tiles (adds only: reducing every tile along
    j would cost warp shuffles per pair) and go into the partial rows once, at tile ti; the j-side
    sums go in at each tile tj as it is done.
    """
    cols_i = ti * BLOCK + tl.arange(0, BLOCK)
    us_i = _load_weights(ws_row, cols_i, C, True)
    ut_i = _load_weights(wt_row, cols_i, C, True)
    tau_acc = tl.zeros([BLOCK, BLOCK], ACC)
    gs_acc = tl.zeros([BLOCK, BLOCK], ACC)
    gt_acc = tl.zeros([BLOCK, BLOCK], ACC)
    n_tiles = tl.cdiv(C, BLOCK)
    n_full_tiles = C // BLOCK
    tau_acc, gs_acc, gt_acc = _tile_pair(
        us_i, ut_i, cols_i, ti, tau_acc, gs_acc, gt_acc,
        ws_row, wt_row, gs_row, gt_row, C, two_k, exp2_scale,
        HARD, NEED_GS, NEED_GT, FORM, True, FAST_RCP, BLOCK)
    for tj in range(ti + 1, n_full_tiles):
        tau_acc, gs_acc, gt_acc = _tile_pair(
            us_i, ut_i, cols_i, tj, tau_acc, gs_acc, gt_acc,
            ws_row, wt_row, gs_row, gt_row, C, two_k, exp2_scale,
            HARD, NEED_GS, NEED_GT, FORM, False, FAST_RCP, BLOCK)
    if (n_full_tiles < n_tiles) & (ti < n_tiles - 1):
        tau_acc, gs_acc, gt_acc = _tile_pair(
            us_i, ut_i, cols_i, n_tiles - 1, tau_acc, gs_acc, gt_acc,
            ws_row, wt_row, gs_row, gt_row, C, two_k, exp2_scale,
            HARD, NEED_GS, NEED_GT, FORM, True, FAST_RCP, BLOCK)
    if NEED_GS:
        _add_into(gs_row, cols_i, C, tl.sum(gs_acc, axis=1), True)
    if NEED_GT:
        _add_into(gt_row, cols_i, C, tl.sum(gt_acc, axis=1), True)
    return tl.sum(tl.sum(tau_acc, axis=1), axis=0)


@triton.jit
def _scale_row(row_ptr, C, scale, bad, BLOCK: tl.constexpr):
    """row *= scale in place (NaN for a row with a non-finite logit)."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        inside = cols < C
        g = tl.load(row_ptr + cols, mask=inside, other=0.0)
        tl.store(row_ptr + cols, tl.where(bad, float("nan"), g * scale), mask=inside)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


# Tiles of 32 or 64 with 4 to 16 pairs per thread: the pair math holds about a dozen values per pair
# in registers, so 128-wide tiles or fewer warps spill (checked by compiling for sm_90: 64 x 64 with 8
# warps uses ~190 registers, with 16 warps ~110-128). num_stages=1: the loop loads two BLOCK-vectors
# per BLOCK^2 pairs, nothing worth pipelining, and no pipeliner may hoist a partial-row load above
# the previous tile's store. All four serve every C (masked edges); the autotuner keys on C.
GPU_CONFIGS = [
    triton.Config({"BLOCK": 32}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK": 32}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK": 64}, num_warps=16, num_stages=1),
]


def interpreter_block(c: int) -> int:
    """Tile width under the interpreter, where a tile costs about the same whatever its size.

    Small rows get 16-wide tiles, so that C of 17, 33 or 100 spans several tiles (the triangle, the
    diagonal and edge masks, the multi-split paths all run); large rows get wide tiles to stay fast.
    """
    return 16 if c <= 160 else 64 if c <= 512 else 128


@triton.jit
def _kendall_pairs_kernel(
    s_ptr, t_ptr, s_stride_row, t_stride_row,
    loss_ptr, gs_ptr, gt_ptr, gs_scratch_ptr, gt_scratch_ptr, tau_scratch_ptr, weights_ptr,
    rows, C, k_hi, k_lo, exp2_scale_hi, exp2_scale_lo, ratio_limit,
    HARD: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
    FUSED_FINALIZE: tl.constexpr, FAST_RCP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (row, split): the split's tile-rows of one row; see the module docstring.

    FUSED_FINALIZE (one split per row): writes the loss and scales the gradient rows in place.
    Otherwise: leaves this split's tau in tau_scratch and its unscaled partial gradient row in the
    output (split 0) or in the scratch rows (split s > 0 at scratch row (s - 1) * rows + row).
    weights_ptr: two rows of C per program (row * splits + split), the student's and the teacher's
    weights (_store_weights).
    """
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    # k and exp2_scale = 2k / ln 2 arrive as float32 halves hi + lo (Triton passes Python floats as
    # float32, and a float literal like 1 / ln 2 would be rounded to float32 too): ~48 bits.
    zero = tl.zeros([1], ACC)
    k = tl.sum(zero + k_hi, axis=0) + tl.sum(zero + k_lo, axis=0)
    exp2_scale = tl.sum(zero + exp2_scale_hi, axis=0) + tl.sum(zero + exp2_scale_lo, axis=0)

    s_row = s_ptr + row * s_stride_row
    t_row = t_ptr + row * t_stride_row
    if split == 0:
        gs_row = gs_ptr + row * C
        gt_row = gt_ptr + row * C
    else:
        scratch_row = ((split - 1) * rows + row).to(tl.int64)
        gs_row = gs_scratch_ptr + scratch_row * C
        gt_row = gt_scratch_ptr + scratch_row * C

    s_lo, s_hi, s_bad = _row_range(s_row, C, ACC, BLOCK)
    t_lo, t_hi, t_bad = _row_range(t_row, C, ACC, BLOCK)
    bad = s_bad | t_bad
    if bad:  # the pair loop is skipped; keep the (unused) range finite all the same
        s_lo = tl.sum(zero, axis=0)
        s_hi = s_lo
        t_lo = s_lo
        t_hi = s_lo
    # Halves first: (max + min) / 2 must not overflow for logits near the dtype's limit.
    s_centre = 0.5 * s_hi + 0.5 * s_lo
    t_centre = 0.5 * t_hi + 0.5 * t_lo
    spread = k * (s_hi - s_lo)
    if not HARD:
        spread = tl.maximum(spread, k * (t_hi - t_lo))
    form = _row_form(spread, ratio_limit)
    two_k = 2.0 * k

    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        if NEED_GS:
            tl.store(gs_row + cols, tl.zeros([BLOCK], ACC), mask=cols < C)
        if NEED_GT:
            tl.store(gt_row + cols, tl.zeros([BLOCK], ACC), mask=cols < C)
    ws_row = weights_ptr + (row * n_splits + split) * 2 * C
    wt_row = ws_row + C
    if not bad:
        if form == FORM_RATIO:
            _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                           ACC, HARD, FORM_RATIO, BLOCK)
        elif form == FORM_SMALL:
            _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                           ACC, HARD, FORM_SMALL, BLOCK)
        else:
            _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                           ACC, HARD, FORM_DIRECT, BLOCK)
    tl.debug_barrier()  # the zeros and the weights are visible to every thread before its loads

    n_tiles = tl.cdiv(C, BLOCK)
    n_rounds = tl.where(bad, 0, tl.cdiv(n_tiles, n_splits))
    tau = tl.sum(zero, axis=0)
    for rnd in range(0, n_rounds):
        # Snake order: round r gives tiles r*S .. r*S+S-1 to splits 0..S-1, reversed on odd rounds.
        ti = rnd * n_splits + split + (rnd % 2) * (n_splits - 1 - 2 * split)
        if ti < n_tiles:
            if form == FORM_RATIO:  # the usual row first
                tau += _tile_row(ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
                                 ACC, HARD, NEED_GS, NEED_GT, FORM_RATIO, FAST_RCP, BLOCK)
            elif form == FORM_SMALL:
                tau += _tile_row(ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
                                 ACC, HARD, NEED_GS, NEED_GT, FORM_SMALL, FAST_RCP, BLOCK)
            else:
                tau += _tile_row(ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
                                 ACC, HARD, NEED_GS, NEED_GT, FORM_DIRECT, False, BLOCK)

    c_acc = tl.sum(zero + C, axis=0)
    inv_pairs = 2.0 / (c_acc * (c_acc - 1.0))
    if FUSED_FINALIZE:
        tl.store(loss_ptr + row, tl.where(bad, float("nan"), 1.0 - tau * inv_pairs))
        tl.debug_barrier()  # this program's last partial-row stores are visible to _scale_row
        grad_scale = -4.0 * k * inv_pairs
        if NEED_GS:
            _scale_row(gs_row, C, grad_scale, bad, BLOCK)
        if NEED_GT:
            _scale_row(gt_row, C, grad_scale, bad, BLOCK)
    else:
        tl.store(tau_scratch_ptr + row * n_splits + split, tl.where(bad, float("nan"), tau))


def _autotune_options() -> Dict[str, bool]:
    """cache_results (Triton >= 3.2): the pick is saved on disk and reused by later processes.

    The tile width and warps fix the order of the sums, so two configurations differ in the last
    bits: with the pick cached, every process on a machine computes bitwise the same results, not
    only every call within one process.
    """
    params = inspect.signature(triton.autotune).parameters
    return {"cache_results": True} if "cache_results" in params else {}


def parse_config(text: str) -> triton.Config:
    """'BLOCK:WARPS' (e.g. '64:8') as a configuration of the pair kernel; one of GPU_CONFIGS."""
    try:
        block, warps = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"RKKD_TRITON_CONFIG must read BLOCK:WARPS (e.g. 64:8), got {text!r}") from None
    for config in GPU_CONFIGS:
        if config.kwargs["BLOCK"] == block and config.num_warps == warps:
            return config
    known = ", ".join(f"{c.kwargs['BLOCK']}:{c.num_warps}" for c in GPU_CONFIGS)
    raise ValueError(f"RKKD_TRITON_CONFIG={text!r} is not one of the kernel's configurations ({known})")


# RKKD_TRITON_CONFIG=BLOCK:WARPS pins one configuration instead of autotuning: no timing runs (the
# test suite on a GPU compiles one kernel per specialization instead of four, and times none), and
# the same order of summation, so the same bits, on every machine. Tests may set it directly.
pinned_config = parse_config(os.environ["RKKD_TRITON_CONFIG"]) if os.environ.get("RKKD_TRITON_CONFIG") \
    else None

# The autotuned kernels, made at first use: Triton < 3.3 asks for an active GPU driver when an
# Autotuner is built, which would make importing this module fail on a machine without a GPU.
_TUNED_KERNELS: Dict[Tuple[int, int], object] = {}


def tuned_kernel(config: Optional[triton.Config] = None):
    """The pair kernel under the autotuner (config None: every GPU_CONFIGS entry, timed on the GPU,
    keyed on C and the flags; a config: that one alone, which Triton launches without timing)."""
    key = (0, 0) if config is None else (config.kwargs["BLOCK"], config.num_warps)
    if key not in _TUNED_KERNELS:
        if config is None:
            # Without prune_configs_by, which torch.compile of user kernels does not support on
            # every torch >= 2.6.
            tuner = triton.autotune(
                configs=GPU_CONFIGS,
                key=["C", "HARD", "NEED_GS", "NEED_GT", "FUSED_FINALIZE", "FAST_RCP"],
                **_autotune_options(),
            )
        else:
            tuner = triton.autotune(configs=[config], key=[])
        _TUNED_KERNELS[key] = tuner(_kendall_pairs_kernel)
    return _TUNED_KERNELS[key]


@triton.jit
def _kendall_finalize_kernel(
    loss_ptr, gs_ptr, gt_ptr, gs_scratch_ptr, gt_scratch_ptr, tau_scratch_ptr,
    rows, C, n_splits, k_hi, k_lo,
    NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, SPLITS_POW2: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (column block, row): adds the splits' partial rows in split order, then scales.

    Column blocks on grid axis 0 (up to 2^31 - 1; axis 1 stops at 65535): C may be long, while
    this kernel runs only for the few rows (fewer than the SMs) that have several splits.
    A NaN tau partial marks a row with a non-finite logit: its loss and gradients become NaN.
    """
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    block = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    zero = tl.zeros([1], ACC)
    k = tl.sum(zero + k_hi, axis=0) + tl.sum(zero + k_lo, axis=0)
    c_acc = tl.sum(zero + C, axis=0)
    inv_pairs = 2.0 / (c_acc * (c_acc - 1.0))
    grad_scale = -4.0 * k * inv_pairs

    splits = tl.arange(0, SPLITS_POW2)
    taus = tl.load(tau_scratch_ptr + row * n_splits + splits, mask=splits < n_splits, other=0.0)
    tau = tl.sum(taus, axis=0)
    bad = tau != tau
    if block == 0:
        tl.store(loss_ptr + row, 1.0 - tau * inv_pairs)

    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = cols < C
    if NEED_GS:
        g = tl.load(gs_ptr + row * C + cols, mask=inside, other=0.0)
        for s in range(1, n_splits):
            g += tl.load(gs_scratch_ptr + ((s - 1) * rows + row) * C + cols, mask=inside, other=0.0)
        tl.store(gs_ptr + row * C + cols, tl.where(bad, float("nan"), g * grad_scale), mask=inside)
    if NEED_GT:
        g = tl.load(gt_ptr + row * C + cols, mask=inside, other=0.0)
        for s in range(1, n_splits):
            g += tl.load(gt_scratch_ptr + ((s - 1) * rows + row) * C + cols, mask=inside, other=0.0)
        tl.store(gt_ptr + row * C + cols, tl.where(bad, float("nan"), g * grad_scale), mask=inside)


# ----------------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------------

_PROGRAMS_PER_DEVICE: Dict[int, int] = {}


def _programs_wanted(device: torch.device) -> int:
    """How many programs keep the device busy: one per SM (the interpreter: a small stand-in)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _PROGRAMS_PER_DEVICE:
        _PROGRAMS_PER_DEVICE[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _PROGRAMS_PER_DEVICE[index]


def num_splits(rows: int, c: int, device: torch.device) -> int:
    """Programs per row: enough for one program per SM in all, within MAX_SPLITS and C's width.

    (splits - 1) * rows < programs wanted, so the scratch rows stay fewer than the SMs.
    """
    wanted = -(-_programs_wanted(device) // max(rows, 1))
    return max(1, min(MAX_SPLITS, wanted, c // MIN_COLUMNS_PER_SPLIT))


def _float32_halves(k: float) -> Tuple[float, float]:
    """k = hi + lo with hi, lo float32 values (Triton passes Python floats as float32)."""
    hi = struct.unpack("f", struct.pack("f", k))[0]
    lo = struct.unpack("f", struct.pack("f", k - hi))[0]
    return hi, lo


def _check_inputs(student: torch.Tensor, teacher: torch.Tensor, k: float) -> None:
    if student.dim() != 2 or teacher.shape != student.shape:
        raise RuntimeError(
            f"{OP_NAME} expects two (rows, C) tensors of one shape, got "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.dtype != teacher.dtype or not student.is_floating_point():
        raise RuntimeError(f"{OP_NAME} expects one floating dtype, got {student.dtype} and {teacher.dtype}")
    if student.device != teacher.device:
        raise RuntimeError(f"{OP_NAME} expects one device, got {student.device} and {teacher.device}")
    if student.shape[1] < 2:
        raise RuntimeError(f"{OP_NAME} needs C >= 2, got {student.shape[1]}")
    if student.shape[0] > MAX_ROWS:  # rows go on grid axis 0, whose limit this is
        raise RuntimeError(f"{OP_NAME} takes at most 2^31 - 1 rows, got {student.shape[0]}")
    if not (math.isfinite(k) and MIN_K <= k < MAX_K):
        raise RuntimeError(f"{OP_NAME} needs k in [2^-100, 1e38), got {k} (the CPU and CUDA backends "
                           "take any positive finite k)")


def _on_device_of(tensor: torch.Tensor):
    """A context that makes ``tensor``'s GPU Triton's current device for the launches inside.

    Triton launches on the current device and its current stream, not on the arguments' device:
    inputs on cuda:1 while cuda:0 is current would run on the wrong GPU. Under the interpreter
    (CPU tensors) there is no device to set.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _launcher(kernel):
    """``kernel[grid](...)`` as the op body calls it.

    On the GPU through ``wrap_triton``, so that torch.compile sees the kernels inside the op. Under
    the interpreter the kernels are plain Python and the op is opaque (see below): call them as is.
    """
    return kernel if INTERPRETING else torch.library.wrap_triton(kernel)


def _kendall_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    k: float,
    hard_teacher: bool,
    need_grad_student: bool,
    need_grad_teacher: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # builtin tuple: see the schema note below
    """The op contract of ``ops.py`` on CUDA tensors (CPU tensors under TRITON_INTERPRET=1).

    Returns ``(loss_rows, grad_student, grad_teacher)`` in the accumulation dtype; a gradient not
    asked for is an empty ``(0,)`` tensor.
    """
    _check_inputs(student, teacher, k)
    rows, c = student.shape
    acc = accumulation_dtype(student.dtype)

    def nothing() -> torch.Tensor:  # a distinct placeholder for each unused output or buffer
        return student.new_empty((0,), dtype=acc)

    loss = student.new_empty((rows,), dtype=acc)
    grad_s = student.new_empty((rows, c), dtype=acc) if need_grad_student else nothing()
    if need_grad_teacher:
        # A hard teacher's gradient is identically zero: no kernel work for it.
        alloc = student.new_zeros if hard_teacher else student.new_empty
        grad_t = alloc((rows, c), dtype=acc)
    else:
        grad_t = nothing()
    if rows == 0:
        return loss, grad_s, grad_t

    need_gs = bool(need_grad_student)
    need_gt = bool(need_grad_teacher and not hard_teacher)
    splits = num_splits(rows, c, student.device)
    fused = splits == 1
    scratch_rows = (splits - 1) * rows
    gs_scratch = student.new_empty((scratch_rows, c), dtype=acc) if need_gs and not fused else nothing()
    gt_scratch = student.new_empty((scratch_rows, c), dtype=acc) if need_gt and not fused else nothing()
    tau_scratch = nothing() if fused else student.new_empty((rows, splits), dtype=acc)
    # Each program's weights of the student and teacher rows (see _store_weights).
    weights = student.new_empty((rows * splits, 2, c), dtype=acc)
    k_hi, k_lo = _float32_halves(float(k))
    exp2_scale_hi, exp2_scale_lo = _float32_halves(2.0 * float(k) / math.log(2.0))
    # Rows may be strided (a view of a bigger tensor); columns must be dense for the kernel.
    if student.stride(1) != 1:
        student = student.contiguous()
    if teacher.stride(1) != 1:
        teacher = teacher.contiguous()

    pair_args = (
        student, teacher, student.stride(0), teacher.stride(0),
        loss, grad_s, grad_t, gs_scratch, gt_scratch, tau_scratch, weights,
        rows, c, k_hi, k_lo, exp2_scale_hi, exp2_scale_lo, RATIO_MAX_SPREAD[acc],
    )
    flags = dict(HARD=bool(hard_teacher), NEED_GS=need_gs, NEED_GT=need_gt, FUSED_FINALIZE=fused)
    with _on_device_of(student):
        if INTERPRETING:
            block = pinned_config.kwargs["BLOCK"] if pinned_config is not None else interpreter_block(c)
            _launcher(_kendall_pairs_kernel)[(rows, splits)](
                *pair_args, **flags, FAST_RCP=False, BLOCK=block, num_warps=1
            )
        else:
            _launcher(tuned_kernel(pinned_config))[(rows, splits)](
                *pair_args, **flags, FAST_RCP=acc == torch.float32
            )
        if not fused:
            _launcher(_kendall_finalize_kernel)[(triton.cdiv(c, FINALIZE_BLOCK), rows)](
                loss, grad_s, grad_t, gs_scratch, gt_scratch, tau_scratch,
                rows, c, splits, k_hi, k_lo,
                NEED_GS=need_gs, NEED_GT=need_gt, SPLITS_POW2=triton.next_power_of_2(splits),
                BLOCK=FINALIZE_BLOCK,
            )
    return loss, grad_s, grad_t


# The schema is the shared one, given rather than inferred. torch 2.6's triton_op still evaluates the
# (postponed, string) annotations, where typing.Tuple is unknown: the return reads tuple[...].
if INTERPRETING:
    # An opaque custom op: fake tensors cannot run interpreted kernels, so torch.compile must not
    # trace into the body; the shared fake implementation gives it the output shapes instead.
    kendall_triton = torch.library.custom_op(OP_NAME, mutates_args=(), schema=ops.SCHEMA)(_kendall_triton)
    kendall_triton.register_fake(ops.kendall_fake)
else:
    # triton_op: torch.compile (Inductor) sees and schedules the kernels; the body, run on fake
    # tensors, is the fake implementation.
    kendall_triton = torch.library.triton_op(OP_NAME, mutates_args=(), schema=ops.SCHEMA)(_kendall_triton)

ops.register_autograd_and_vmap(OP_NAME)
