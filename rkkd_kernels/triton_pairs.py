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

*tanh of a pair* comes from ``triton_pair_math.py`` (the Triton copy of csrc/pair_math.h): per row
one of three forms, chosen inside the kernel by the row's k * (max - min). Each program writes its
row's weights (expm1 or exp of 2k (x - centre), or the logits) into its own weight rows once, and
the tile loop loads them: one exp per element and program, not per pair or tile. Interior tiles
skip the per-pair mask and the bounds tests of their loads and stores; only diagonal and last
tiles carry them.

Under TRITON_INTERPRET=1 the op is an opaque ``custom_op`` (fake tensors cannot run interpreted
kernels); on the GPU it is a ``triton_op``, so torch.compile sees the kernels
(``triton_runtime.register_op``).

Rows holding a non-finite logit skip the pair loop and get NaN loss and gradients (a hard teacher's
zero gradient stays zero).
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl

from .checks import KRange, check_op_inputs
from .dtypes import accumulation_dtype
from .row_paths import RATIO_MAX_SPREAD
from .triton_pair_math import (
    FORM_DIRECT,
    FORM_RATIO,
    FORM_SMALL,
    from_halves,
    inv_pairs,
    row_centre,
    row_form,
    row_range,
    sign,
    tanh_pair,
    weights,
)
from .triton_runtime import (
    INTERPRETING,
    MAX_GRID_ROWS,
    float32_halves,
    launcher,
    on_device_of,
    register_op,
)

if not hasattr(torch.library, "triton_op"):  # backends reads an ImportError as "Triton absent"
    raise ImportError(
        f"the Triton backend needs torch >= 2.6 (torch.library.triton_op); torch is {torch.__version__}"
    )

OP_NAME = "rkkd::kendall_triton"

# At most this many programs share one row (the finalize kernel adds their partial rows).
MAX_SPLITS = 64
# A split gets at least this many columns (two or more tile-rows), or the split's fixed costs (row
# range, zeroing its partial row) would outweigh its share of the pairs.
MIN_COLUMNS_PER_SPLIT = 16 if INTERPRETING else 128
# The interpreter has no SMs; this stands in so that small test inputs exercise multi-split rows.
INTERPRETER_PROGRAMS = 4

FINALIZE_BLOCK = 16 if INTERPRETING else 1024
# The k range (docs/contract.md, "Precision"): k arrives as two float32 halves, whose low half must
# stay a normal float32 (k * 2^-24 >= 2^-126) for ~48 bits of k; 2k / ln 2 must stay below float32's
# largest value.
K_RANGE = KRange(2.0**-100, 1.0e38, "[2^-100, 1e38), as it reaches the Triton kernels as two float32 "
                 "halves (the CPU and CUDA backends take any positive finite k)")


# ----------------------------------------------------------------------------------------------
# The tile loop
# ----------------------------------------------------------------------------------------------


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
def _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                   ACC: tl.constexpr, HARD: tl.constexpr, FORM: tl.constexpr, BLOCK: tl.constexpr):
    """The weights of both rows (triton_pair_math.weights; a hard teacher: its logits), once per
    program, into its own weight rows: the tile loop loads them instead of taking an exp of each
    tile's j side for every tile-row (and in every warp that holds the tile's j side)."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        inside = cols < C
        us = weights(tl.load(s_row + cols, mask=inside, other=0.0).to(ACC), s_centre, two_k,
                     exp2_scale, FORM)
        tl.store(ws_row + cols, us, mask=inside)
        ut = tl.load(t_row + cols, mask=inside, other=0.0).to(ACC)
        if not HARD:
            ut = weights(ut, t_centre, two_k, exp2_scale, FORM)
        tl.store(wt_row + cols, ut, mask=inside)


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
    th_s, qs_s = tanh_pair(us_i[:, None], us_j[None, :], two_k, exp2_scale, FORM, FAST_RCP)
    if HARD:
        w = sign(ut_i[:, None] - ut_j[None, :])
        qs_t = w  # unused: a hard teacher has no gradient
    else:
        w, qs_t = tanh_pair(ut_i[:, None], ut_j[None, :], two_k, exp2_scale, FORM, FAST_RCP)
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
def tile_row(
    ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
    ACC: tl.constexpr, HARD: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
    FORM: tl.constexpr, FAST_RCP: tl.constexpr, BLOCK: tl.constexpr,
):
    """Tiles (ti, tj), tj = ti .. n_tiles-1, of one row; returns their share of P * tau. Also the
    exponential-sum kernel's fallback rows (triton_expsum.py).

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


@triton.jit
def _partial_rows(gs_ptr, gt_ptr, gs_scratch_ptr, gt_scratch_ptr, row, split, rows, C):
    """The gradient rows this program owns: the output rows (split 0) or its scratch rows."""
    if split == 0:
        gs_row = gs_ptr + row * C
        gt_row = gt_ptr + row * C
    else:
        scratch_row = ((split - 1) * rows + row).to(tl.int64)
        gs_row = gs_scratch_ptr + scratch_row * C
        gt_row = gt_scratch_ptr + scratch_row * C
    return gs_row, gt_row


@triton.jit
def _row_set_up(s_row, t_row, C, k, ratio_limit, ACC: tl.constexpr, HARD: tl.constexpr,
                BLOCK: tl.constexpr):
    """(student centre, teacher centre, any non-finite logit, FORM) of one row."""
    s_lo, s_hi, s_bad = row_range(s_row, C, ACC, BLOCK)
    t_lo, t_hi, t_bad = row_range(t_row, C, ACC, BLOCK)
    bad = s_bad | t_bad
    if bad:  # the pair loop is skipped; keep the (unused) range finite all the same
        s_lo = tl.sum(tl.zeros([1], ACC), axis=0)
        s_hi = s_lo
        t_lo = s_lo
        t_hi = s_lo
    s_centre = row_centre(s_lo, s_hi)
    t_centre = row_centre(t_lo, t_hi)
    spread = k * (s_hi - s_lo)
    if not HARD:
        spread = tl.maximum(spread, k * (t_hi - t_lo))
    return s_centre, t_centre, bad, row_form(spread, ratio_limit)


@triton.jit
def _zero_rows(gs_row, gt_row, C, ACC: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
               BLOCK: tl.constexpr):
    """Zeros into the partial gradient rows that the tile loop adds to."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, C, BLOCK):
        cols = start + offs
        if NEED_GS:
            tl.store(gs_row + cols, tl.zeros([BLOCK], ACC), mask=cols < C)
        if NEED_GT:
            tl.store(gt_row + cols, tl.zeros([BLOCK], ACC), mask=cols < C)


@triton.jit
def _store_row_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale, form,
                       ACC: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr):
    """_store_weights of the row's form (a runtime value, one uniform branch per row)."""
    if form == FORM_RATIO:
        _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                       ACC, HARD, FORM_RATIO, BLOCK)
    elif form == FORM_SMALL:
        _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                       ACC, HARD, FORM_SMALL, BLOCK)
    else:
        _store_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                       ACC, HARD, FORM_DIRECT, BLOCK)


@triton.jit
def _split_share(ws_row, wt_row, gs_row, gt_row, split, n_splits, C, two_k, exp2_scale, form, bad,
                 ACC: tl.constexpr, HARD: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
                 FAST_RCP: tl.constexpr, BLOCK: tl.constexpr):
    """This split's tile-rows of the row (none for a row with a non-finite logit); returns their
    share of P * tau."""
    n_tiles = tl.cdiv(C, BLOCK)
    n_rounds = tl.where(bad, 0, tl.cdiv(n_tiles, n_splits))
    tau = tl.sum(tl.zeros([1], ACC), axis=0)
    for rnd in range(0, n_rounds):
        # Snake order: round r gives tiles r*S .. r*S+S-1 to splits 0..S-1, reversed on odd rounds.
        ti = rnd * n_splits + split + (rnd % 2) * (n_splits - 1 - 2 * split)
        if ti < n_tiles:
            if form == FORM_RATIO:  # the usual row first
                tau += tile_row(ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
                                ACC, HARD, NEED_GS, NEED_GT, FORM_RATIO, FAST_RCP, BLOCK)
            elif form == FORM_SMALL:
                tau += tile_row(ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
                                ACC, HARD, NEED_GS, NEED_GT, FORM_SMALL, FAST_RCP, BLOCK)
            else:
                tau += tile_row(ws_row, wt_row, gs_row, gt_row, ti, C, two_k, exp2_scale,
                                ACC, HARD, NEED_GS, NEED_GT, FORM_DIRECT, False, BLOCK)
    return tau


@triton.jit
def _finish_split(loss_ptr, tau_scratch_ptr, gs_row, gt_row, row, split, n_splits, C, k, tau, bad,
                  ACC: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
                  FUSED_FINALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """FUSED_FINALIZE: the row's loss, and its gradient rows scaled in place; else this split's tau
    into tau_scratch for the finalize kernel."""
    if FUSED_FINALIZE:
        scale = inv_pairs(C, ACC)
        tl.store(loss_ptr + row, tl.where(bad, float("nan"), 1.0 - tau * scale))
        tl.debug_barrier()  # this program's last partial-row stores are visible to _scale_row
        grad_scale = -4.0 * k * scale
        if NEED_GS:
            _scale_row(gs_row, C, grad_scale, bad, BLOCK)
        if NEED_GT:
            _scale_row(gt_row, C, grad_scale, bad, BLOCK)
    else:
        tl.store(tau_scratch_ptr + row * n_splits + split, tl.where(bad, float("nan"), tau))


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
    weights (_store_weights). k and exp2_scale = 2k / ln 2 arrive as float32 halves (from_halves).
    """
    ACC: tl.constexpr = loss_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    k = from_halves(k_hi, k_lo, ACC)
    exp2_scale = from_halves(exp2_scale_hi, exp2_scale_lo, ACC)
    s_row = s_ptr + row * s_stride_row
    t_row = t_ptr + row * t_stride_row
    gs_row, gt_row = _partial_rows(gs_ptr, gt_ptr, gs_scratch_ptr, gt_scratch_ptr, row, split, rows, C)
    s_centre, t_centre, bad, form = _row_set_up(s_row, t_row, C, k, ratio_limit, ACC, HARD, BLOCK)
    two_k = 2.0 * k
    _zero_rows(gs_row, gt_row, C, ACC, NEED_GS, NEED_GT, BLOCK)
    ws_row = weights_ptr + (row * n_splits + split) * 2 * C
    wt_row = ws_row + C
    if not bad:
        _store_row_weights(s_row, t_row, ws_row, wt_row, C, s_centre, t_centre, two_k, exp2_scale,
                           form, ACC, HARD, BLOCK)
    tl.debug_barrier()  # the zeros and the weights are visible to every thread before its loads
    tau = _split_share(ws_row, wt_row, gs_row, gt_row, split, n_splits, C, two_k, exp2_scale, form,
                       bad, ACC, HARD, NEED_GS, NEED_GT, FAST_RCP, BLOCK)
    _finish_split(loss_ptr, tau_scratch_ptr, gs_row, gt_row, row, split, n_splits, C, k, tau, bad,
                  ACC, NEED_GS, NEED_GT, FUSED_FINALIZE, BLOCK)


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
    k = from_halves(k_hi, k_lo, ACC)
    scale = inv_pairs(C, ACC)
    grad_scale = -4.0 * k * scale

    splits = tl.arange(0, SPLITS_POW2)
    taus = tl.load(tau_scratch_ptr + row * n_splits + splits, mask=splits < n_splits, other=0.0)
    tau = tl.sum(taus, axis=0)
    bad = tau != tau
    if block == 0:
        tl.store(loss_ptr + row, 1.0 - tau * scale)

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


def _nothing(like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A distinct (0,) placeholder for each unused output or buffer."""
    return like.new_empty((0,), dtype=dtype)


def _outputs(student: torch.Tensor, hard_teacher: bool, need_grad_student: bool,
             need_grad_teacher: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_rows, grad_student, grad_teacher) in the accumulation dtype, (0,) where not asked for."""
    rows, c = student.shape
    acc = accumulation_dtype(student.dtype)
    loss = student.new_empty((rows,), dtype=acc)
    grad_s = student.new_empty((rows, c), dtype=acc) if need_grad_student else _nothing(student, acc)
    if need_grad_teacher:
        # A hard teacher's gradient is identically zero: no kernel work for it.
        alloc = student.new_zeros if hard_teacher else student.new_empty
        grad_t = alloc((rows, c), dtype=acc)
    else:
        grad_t = _nothing(student, acc)
    return loss, grad_s, grad_t


def _launch(student, teacher, k: float, loss, grad_s, grad_t, hard: bool, need_gs: bool,
            need_gt: bool) -> None:
    """The pair kernel over (row, split), then, where a row has several splits, the finalize kernel."""
    rows, c = student.shape
    acc = loss.dtype
    splits = num_splits(rows, c, student.device)
    fused = splits == 1
    scratch_rows = (splits - 1) * rows
    scratch = [student.new_empty((scratch_rows, c), dtype=acc) if need and not fused
               else _nothing(student, acc) for need in (need_gs, need_gt)]
    gs_scratch, gt_scratch = scratch
    tau_scratch = _nothing(student, acc) if fused else student.new_empty((rows, splits), dtype=acc)
    # Each program's weights of the student and teacher rows (see _store_weights).
    weights = student.new_empty((rows * splits, 2, c), dtype=acc)
    k_hi, k_lo = float32_halves(float(k))
    exp2_scale_hi, exp2_scale_lo = float32_halves(2.0 * float(k) / math.log(2.0))
    pair_args = (
        student, teacher, student.stride(0), teacher.stride(0),
        loss, grad_s, grad_t, gs_scratch, gt_scratch, tau_scratch, weights,
        rows, c, k_hi, k_lo, exp2_scale_hi, exp2_scale_lo, RATIO_MAX_SPREAD[acc],
    )
    flags = dict(HARD=hard, NEED_GS=need_gs, NEED_GT=need_gt, FUSED_FINALIZE=fused)
    with on_device_of(student):
        if INTERPRETING:
            block = pinned_config.kwargs["BLOCK"] if pinned_config is not None else interpreter_block(c)
            launcher(_kendall_pairs_kernel)[(rows, splits)](
                *pair_args, **flags, FAST_RCP=False, BLOCK=block, num_warps=1
            )
        else:
            launcher(tuned_kernel(pinned_config))[(rows, splits)](
                *pair_args, **flags, FAST_RCP=acc == torch.float32
            )
        if not fused:
            launcher(_kendall_finalize_kernel)[(triton.cdiv(c, FINALIZE_BLOCK), rows)](
                loss, grad_s, grad_t, gs_scratch, gt_scratch, tau_scratch,
                rows, c, splits, k_hi, k_lo,
                NEED_GS=need_gs, NEED_GT=need_gt, SPLITS_POW2=triton.next_power_of_2(splits),
                BLOCK=FINALIZE_BLOCK,
            )


def _kendall_triton(student: torch.Tensor, teacher: torch.Tensor, k: float, hard_teacher: bool,
                    need_grad_student: bool, need_grad_teacher: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # builtin tuple: see below
    """The op contract of ``ops.py`` on CUDA tensors (CPU tensors under TRITON_INTERPRET=1)."""
    check_op_inputs(OP_NAME, student, teacher, k, K_RANGE, MAX_GRID_ROWS)
    loss, grad_s, grad_t = _outputs(student, hard_teacher, need_grad_student, need_grad_teacher)
    if student.shape[0] > 0:
        # Rows may be strided (a view of a bigger tensor); columns must be dense for the kernel.
        if student.stride(1) != 1:
            student = student.contiguous()
        if teacher.stride(1) != 1:
            teacher = teacher.contiguous()
        _launch(student, teacher, k, loss, grad_s, grad_t, bool(hard_teacher), bool(need_grad_student),
                bool(need_grad_teacher and not hard_teacher))
    return loss, grad_s, grad_t


# The schema is the shared one, given rather than inferred. torch 2.6's triton_op still evaluates the
# (postponed, string) annotations, where typing.Tuple is unknown: the return reads tuple[...].
kendall_triton = register_op(OP_NAME, _kendall_triton)
