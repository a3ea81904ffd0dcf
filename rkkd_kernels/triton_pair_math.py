"""The pair terms of the soft-Kendall loss for Triton kernels: the Triton copy of csrc/pair_math.h.

Triton cannot include the C++ header, so this module mirrors it section by section: the limits
(from ``row_paths.py``, which a test holds equal to the header's), the arithmetic that differs by
target (reciprocal, sign), the row's path (``row_form``, the rule of ``choose_row_path``), the row's
centre and range, the per-element weights and the three tanh forms of a pair. The pair kernel
(``triton_pairs.py``) and the exponential-sum kernel's fallback rows (``triton_expsum.py``) use them.

*tanh of a pair, exactly for every spread.* Per row, with centre c = (max + min) / 2 and
a_i = exp(2k (x_i - c)) (one exp per element, not per pair):

    tanh(k (x_i - x_j)) = p - q,   (1 - tanh^2) / 4 = p * q,   p = a_i / (a_i + a_j), q = a_j / (a_i + a_j)

One division per pair and tensor, no cancellation where tanh saturates (p * q stays accurate where
1 - tanh^2 would round to 0). It has no overflow while k * (max - min) <= 80 (float32) or 700
(float64), where every a_i is a normal number and a_i + a_j cannot overflow. Its tanh is exact to
ulps of 1, though, not of tanh: rows of k * (max - min) <= 1 take the small-spread form instead,
e_i = expm1(2k (x_i - c)) and tanh = (e_i - e_j) / (e_i + e_j + 2), exact relative to the row's
largest tanh for any k > 0 (expm1 is a series here: Triton has no expm1). Rows beyond the ratio form
take the direct form, tanh(d) = sign(d) (1 - e) / (1 + e) with e = exp(-2|d|) in (0, 1], which
cannot overflow either; the choice is one uniform branch per row, taken inside the kernel (no host
sync). The ratio form is also what makes the GPU fast: one reciprocal per pair and tensor
(rcp.approx.ftz.f32, 1 ulp, for float32 on the GPU), and one exp2 per element, with 2k / ln 2 folded
into a per-row scale; no libdevice tanh, and none of tanh.approx's 2^-11 error. The interpreter,
which has no libdevice, runs the same code with an exact division.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import row_paths

# ----------------------------------------------------------------------------------------------
# Limits (RatioLimits and kSmallSpreadMax there; the ratio limit reaches kernels as an argument)
# ----------------------------------------------------------------------------------------------

SMALL_SPREAD_MAX: tl.constexpr = tl.constexpr(row_paths.SMALL_SPREAD_MAX)

# How a row's pairs are computed (constexpr FORM of the pair functions; RowPath there).
FORM_SMALL: tl.constexpr = tl.constexpr(0)  # e = expm1(2k (x - centre)), tanh from e_i, e_j
FORM_RATIO: tl.constexpr = tl.constexpr(1)  # a = exp(2k (x - centre)), tanh from a_i, a_j
FORM_DIRECT: tl.constexpr = tl.constexpr(2)  # the logits themselves, tanh of each difference


# ----------------------------------------------------------------------------------------------
# The arithmetic that differs by target (Arith there)
# ----------------------------------------------------------------------------------------------


@triton.jit
def reciprocal(x, FAST_RCP: tl.constexpr):
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
def sign(x):
    """sign(x) with sign(0) = 0, in x's dtype: the hard teacher's weight."""
    return (x > 0).to(x.dtype) - (x < 0).to(x.dtype)


# ----------------------------------------------------------------------------------------------
# The row: its path, centre and range (choose_row_path, row_centre, row_range there)
# ----------------------------------------------------------------------------------------------


@triton.jit
def row_form(spread, ratio_limit):
    """FORM of a row of finite logits from k * max(spread of student, of teacher): the rule of
    choose_row_path, less its double ratio form (a float32 row beyond the float ratio form takes
    the direct form here, in float32, which cannot overflow)."""
    return tl.where(spread <= SMALL_SPREAD_MAX, FORM_SMALL,
                    tl.where(spread <= ratio_limit, FORM_RATIO, FORM_DIRECT))


@triton.jit
def row_centre(lo, hi):
    """(max + min) / 2, halves first: hi + lo would overflow for logits near the dtype's limit."""
    return 0.5 * hi + 0.5 * lo


@triton.jit
def row_range(row_ptr, C, ACC: tl.constexpr, BLOCK: tl.constexpr):
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


# ----------------------------------------------------------------------------------------------
# Per-element weights: expm1 (small-spread form), exp (ratio form), the logit (direct form)
# ----------------------------------------------------------------------------------------------


@triton.jit
def expm1(x):
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
def weights(x, centre, two_k, exp2_scale, FORM: tl.constexpr):
    """The weights of tanh_pair: expm1(2k (x - centre)), exp(2k (x - centre)) or x itself.

    exp2 with 2k / ln 2 folded into one per-row scale: one rounding fewer than exp's own x * log2 e.
    """
    if FORM == FORM_SMALL:
        u = expm1(two_k * (x - centre))
    elif FORM == FORM_RATIO:
        u = tl.exp2(exp2_scale * (x - centre))
    else:
        u = x
    return u


# ----------------------------------------------------------------------------------------------
# tanh of a pair and (1 - tanh^2) / 4 (tanh_from_ratio, tanh_from_expm1, tanh_direct there)
# ----------------------------------------------------------------------------------------------


@triton.jit
def tanh_from_ratio(a_i, a_j, FAST_RCP: tl.constexpr):
    """Ratio form: p = a_i / (a_i + a_j) and q = a_j / (a_i + a_j) lie in [0, 1], so tanh = p - q
    and (1 - tanh^2) / 4 = p q, with no cancellation where tanh saturates."""
    inv = reciprocal(a_i + a_j, FAST_RCP)
    p = a_i * inv
    q = a_j * inv
    return p - q, p * q


@triton.jit
def tanh_from_expm1(e_i, e_j, FAST_RCP: tl.constexpr):
    """Small-spread form: |tanh| <= tanh(1) on these rows, so 1 - tanh^2 >= 0.41, no cancellation."""
    inv = reciprocal(e_i + e_j + 2.0, FAST_RCP)
    th = (e_i - e_j) * inv
    return th, 0.25 - 0.25 * th * th


@triton.jit
def tanh_direct(d, two_k, exp2_scale):
    """Direct form of d = x_i - x_j: tanh|z| = -m / (2 + m), m = expm1(-2|z|), z = k d, exact for
    small |z| too (1 - exp(-2|z|) would cancel there); (1 - tanh^2) / 4 = e / (1 + e)^2 with
    e = exp(-2|z|) in (0, 1], which does not overflow, and is 0 where tanh saturates."""
    e = tl.exp2(-exp2_scale * tl.abs(d))
    m = expm1(-two_k * tl.abs(d))
    inv = 1.0 / (1.0 + e)
    th = -m * inv
    th = tl.where(d < 0, -th, th)
    return th, e * inv * inv


@triton.jit
def tanh_pair(u_i, u_j, two_k, exp2_scale, FORM: tl.constexpr, FAST_RCP: tl.constexpr):
    """tanh(k (x_i - x_j)) and (1 - tanh^2) / 4 of a tile of pairs; two_k = 2k, exp2_scale = 2k / ln 2.

    u are the weights of ``weights``: expm1 (FORM_SMALL), exp (FORM_RATIO) or the logits (FORM_DIRECT).
    """
    if FORM == FORM_SMALL:
        th, quarter_sech2 = tanh_from_expm1(u_i, u_j, FAST_RCP)
    elif FORM == FORM_RATIO:
        th, quarter_sech2 = tanh_from_ratio(u_i, u_j, FAST_RCP)
    else:
        th, quarter_sech2 = tanh_direct(u_i - u_j, two_k, exp2_scale)
    return th, quarter_sech2


# ----------------------------------------------------------------------------------------------
# The row's scale factors (RowScale there) and scalar arguments
# ----------------------------------------------------------------------------------------------


@triton.jit
def inv_pairs(C, ACC: tl.constexpr):
    """1 / P = 2 / (C (C - 1)) in the accumulation dtype."""
    c_acc = tl.sum(tl.zeros([1], ACC) + C, axis=0)
    return 2.0 / (c_acc * (c_acc - 1.0))


@triton.jit
def from_halves(hi, lo, ACC: tl.constexpr):
    """hi + lo in the accumulation dtype: a float64 scalar passed as two float32 halves (Triton passes
    Python floats as float32, and a float literal like 1 / ln 2 would be rounded to float32 too)."""
    zero = tl.zeros([1], ACC)
    return tl.sum(zero + hi, axis=0) + tl.sum(zero + lo, axis=0)
