"""The hard-teacher loss in O(C * M): exponential sums along the teacher's order.

With a hard teacher every pair's weight is sign(t_p - t_q), so once a row is sorted by teacher logit
(descending, stable) the weight of a pair is +1 when p lies in a strictly earlier group of equal
teacher values than q, and 0 inside a group. With ``a = exp(2k (s - c))`` (c a centre of the row):

    tanh(k (s_p - s_q)) = 1 - 2 a_q / (a_p + a_q)
    P * tau             = N - 2 * sum_{p before q} a_q / (a_p + a_q)        N = untied pairs
    (1 - tanh^2) / 4    = a_p a_q / (a_p + a_q)^2

Both kernels are functions of x = a_p + a_q: 1/x and 1/x^2. Write them as integrals and discretise
with the trapezoid rule on a fixed lattice t_m = m * h:

    1/x   = integral exp(t - x e^t) dt    ~ h sum_m e^{t_m}  exp(-e^{t_m} x)
    1/x^2 = integral exp(2t - x e^t) dt   ~ h sum_m e^{2t_m} exp(-e^{t_m} x)

Each term factorises over p and q, so with ``y_m,i = exp(t_m + 2k (s_i - c))``, ``E = exp(-y)`` and
``F = y * E`` (built this way because e^{t_m} alone would overflow float32 where k * R is large):

    a_q / (a_p + a_q)        ~ h sum_m F_m,q E_m,p
    a_p a_q / (a_p + a_q)^2  ~ h sum_m F_m,p F_m,q

and the sums over "p before q" become prefix sums along the teacher's order, one per node. So

    P * tau        = N - 2 h sum_m sum_q F_m,q * prefE_m(q)  =  N - 2 h sum_m sum_p E_m,p * sufF_m(p)
    d(P tau)/ds_x  = 4 k h sum_m F_m,x * (sufF_m(x) - prefF_m(x))

where prefX_m(x) sums X over the groups strictly before x's group and sufF_m(x) over those strictly
after it. Every term is positive; the prefix and suffix sums are accumulated directly (in float64,
or in float32 lanes flushed into float64 every 16 elements), never as a total minus a part, which
would cancel. A row costs O(C log C) for the sort and O(C * M) for two scans (forward: the prefix
part; backward, recomputing the exponentials: the loss and the suffix part).

The error, and the lattice (this module is the one definition of it; the CPU kernel's
``csrc/expsum.h`` holds the same step, cut and limit, and a test checks that they agree):

- Discretisation: by Poisson summation the trapezoid sum of exp(p t - x e^t), p = 1 or 2, is the
  integral times ``1 + sum_{j != 0} Gamma(p + 2 pi i j / h) / Gamma(p) x^{...}``, so its relative
  error is at most ``2 sum_{j >= 1} |Gamma(p + 2 pi i j / h)| / Gamma(p)``, for every x > 0. With
  ``|Gamma(1 + i w)|^2 = pi w / sinh(pi w)`` and ``|Gamma(2 + i w)|^2 = (1 + w^2) |Gamma(1 + i w)|^2``
  that is, for h = 7/16, 3.0e-9 (1/x) and 4.4e-8 (1/x^2); for h = 9/32, 1.4e-14 and 3.0e-13. The
  1/x^2 error is the larger (by the factor sqrt(1 + w^2), w = 2 pi / h), so it sizes h.
- Range: a centred row has ``a`` in [e^{-kR}, e^{kR}], R = max(s) - min(s), so x lies in
  [2 e^{-kR}, 2 e^{kR}]. The nodes below t_lo are dropped where ``x_max h sum_{t_m < t_lo} e^{t_m}``
  is below ``cut`` (that tail bounds the relative error of both sums), those above t_hi where the
  1/x^2 tail ``h v^2 e^{-v} + (1 + v) e^{-v}``, v = x_min e^{t_hi}, is below ``cut``. So
  t_lo = lead - kR and t_hi = tail + kR, and M = (t_hi - t_lo) / h grows linearly with kR
  (float32: 89 nodes at kR = 8.5, 141 at 20, 416 at 80).
- The nodes are a fixed lattice m * h; a row chooses only which m it uses. Nodes placed by R would
  move with the data and make the loss jump by about the error, which breaks a gradient check.

On the CPU (``csrc/kendall_expsum_cpu.cpp``) float32 inputs compute the exponentials in float32
(the prefix sums in float64); float64 inputs in float64. The Triton kernel (``triton_expsum.py``)
computes in float64 throughout. A row whose k * R exceeds ``max_spread`` (80 for float32, where 2k(s - c) rounded to float32
is still as accurate as the pair kernel's own, 700 for float64) is computed by the pair kernel
inside the same op, with no host synchronisation.

The choice between the methods, ``method="auto"``, is made on the host from C, k and the dtype alone
(it never reads the tensors, which would force a synchronisation on a GPU), by the cost model of
:func:`expsum_is_cheaper`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Tuple

import torch

from . import ops
from .dtypes import accumulation_dtype

METHODS = ("auto", "pairs", "expsum")
OP_NAME = "rkkd::kendall_expsum"

# Backends that have the exponential-sum method (the CUDA extension and the reference do not).
EXPSUM_BACKENDS = ("cpu", "triton")


@dataclass(frozen=True)
class Lattice:
    """The trapezoid lattice t_m = m * step of one precision, and the spread it serves."""

    step: float  # h: a dyadic number, so that m * h is exact in float32
    cut: float  # relative error allowed to each of the two dropped tails
    max_spread: float  # largest k * (max(s) - min(s)) the method serves; beyond it, the pair kernel

    def discretisation_error(self, power: int) -> float:
        """Bound on the relative error of the trapezoid sum of 1/x (power 1) or 1/x^2 (power 2)."""
        total = 0.0
        for j in range(1, 8):
            w = 2.0 * math.pi * j / self.step
            if math.pi * w > 1400:  # sinh overflows; the term is below 1e-300
                break
            gamma_sq = math.pi * w / math.sinh(math.pi * w)
            if power == 2:
                gamma_sq *= 1.0 + w * w
            total += 2.0 * math.sqrt(gamma_sq)
        return total

    # t_lo = lead - kR: the left tail, h e^{t_lo} / (1 - e^{-h}) times x_max = 2 e^{kR}, is cut.
    lead: float = field(init=False)
    # t_hi = tail + kR: v = x_min e^{t_hi} solves h v^2 e^{-v} + (1 + v) e^{-v} = cut.
    tail: float = field(init=False)

    def __post_init__(self) -> None:
        # Computed once, as plain attributes: torch.compile reads them as constants (a cached
        # function in their place makes Dynamo warn and trace the bisection).
        h = self.step
        object.__setattr__(self, "lead", math.log(self.cut * (1.0 - math.exp(-h)) / (2.0 * h)))
        object.__setattr__(self, "tail", math.log(_right_cut(h, self.cut) / 2.0))

    def node_range(self, spread: float) -> Tuple[int, int]:
        """(m_lo, m_hi), the first and last node of a row with k * (max - min) = spread."""
        h = self.step
        m_lo = math.floor((self.lead - spread) / h) + 1
        m_hi = math.ceil((self.tail + spread) / h) - 1
        return m_lo, m_hi

    def nodes(self, spread: float) -> int:
        m_lo, m_hi = self.node_range(spread)
        return m_hi - m_lo + 1


def _right_cut(step: float, cut: float) -> float:
    """The v > 2 where h v^2 e^{-v} + (1 + v) e^{-v} falls to ``cut`` (decreasing there): bisection."""
    lo, hi = 2.0, 800.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (step * mid * mid + 1.0 + mid) * math.exp(-mid) <= cut:
            hi = mid
        else:
            lo = mid
    return hi


# float32: 1/x^2 discretised to 4.4e-8 and tails of 1e-8; float64: 3.0e-13 and 1e-14. Mirrored by
# csrc/expsum.h (ExpsumLattice), which must hold the same three numbers (tests/test_shared_constants.py).
LATTICES = {
    torch.float32: Lattice(step=7.0 / 16.0, cut=1e-8, max_spread=80.0),
    torch.float64: Lattice(step=9.0 / 32.0, cut=1e-14, max_spread=700.0),
}


def lattice(dtype: torch.dtype) -> Lattice:
    """The lattice of an input dtype (half types compute in float32)."""
    return LATTICES[accumulation_dtype(dtype)]


# ------------------------------------------------------------------------------------------------
# The cost model of method="auto".
# ------------------------------------------------------------------------------------------------

# Logit spread assumed by "auto" (it may not read the tensors): k * ASSUMED_SPREAD, capped at the
# lattice's limit, sizes M. Standard-normal logits span about 6.5 at C = 1000 and 8.5 at C = 32,000;
# trained classifiers' logits span 10 to 30. A row that spreads wider costs more nodes (M grows
# linearly with kR), never a wrong result.
ASSUMED_SPREAD = 16.0

# Time per unit of work, in pairs of the pair kernel, per backend and compute dtype: (one element and
# node of the two scans, one element's fixed costs: sort, set-up, the scans' per-element work).
# Fitted to the float32 CPU cells of benchmarks/bench_expsum.py (AVX-512, 2 threads, k = 1, standard
# normal logits): C = 1000 took 0.154 ms per row (376k pairs' time; the model says 427k) and
# C = 32,000 5.45 ms (14.5M; the model 14.1M). float64 is taken to scale alike (both methods compute
# in double). With ASSUMED_SPREAD, k = 1 gives M = 117 and a crossover near C = 1000.
# The Triton kernel has no entry: it has not been timed on a GPU yet, so "auto" keeps the pair
# kernel there and only method="expsum" selects it.
COSTS = {
    ("cpu", torch.float32): (2.5, 200.0),
    ("cpu", torch.float64): (2.5, 200.0),
}


def expsum_cost(backend: str, c: int, k: float, dtype: torch.dtype) -> float:
    """Modelled time of the exponential sums for one row, in pair-kernel pairs."""
    acc = accumulation_dtype(dtype)
    lat = LATTICES[acc]
    per_node, per_element = COSTS[(backend, acc)]
    m = lat.nodes(min(k * ASSUMED_SPREAD, lat.max_spread))
    return c * (per_node * m + per_element + math.log2(c))


def expsum_is_cheaper(backend: str, c: int, k: float, dtype: torch.dtype) -> bool:
    """The cost model: C (C - 1) / 2 pairs against C * (cost of M nodes + the row's fixed costs)."""
    return expsum_cost(backend, c, k, dtype) < c * (c - 1) / 2


def check_method(method: str, hard_teacher: bool) -> None:
    """ValueError for an unknown method, or the exponential sums with a soft teacher."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "expsum" and not hard_teacher:
        raise ValueError(
            "method='expsum' needs hard_teacher=True: the exponential sums rely on every pair's weight "
            "being sign(t_p - t_q), which is constant along the teacher's order; a soft teacher's "
            "weight tanh(k (t_p - t_q)) is not, so it keeps the pair kernel (method='pairs' or 'auto')"
        )


def choose(method: str, backend: str, c: int, k: float, dtype: torch.dtype, hard_teacher: bool) -> str:
    """Resolve ``method`` to ``"pairs"`` or ``"expsum"`` for one call (host-side: no tensor is read).

    ``"auto"`` takes the exponential sums for a hard teacher on a backend that has them when the cost
    model says they are cheaper; ``"expsum"`` on a backend without them is a ValueError.
    """
    check_method(method, hard_teacher)
    if method == "pairs" or not hard_teacher:
        return "pairs"
    if backend not in EXPSUM_BACKENDS:
        if method == "expsum":
            raise ValueError(
                f"method='expsum' is implemented by the backends {EXPSUM_BACKENDS}, not {backend!r}"
            )
        return "pairs"
    if method == "expsum":
        return "expsum"
    if (backend, accumulation_dtype(dtype)) not in COSTS:  # not measured: keep the pair kernel
        return "pairs"
    return "expsum" if expsum_is_cheaper(backend, c, k, dtype) else "pairs"


# ------------------------------------------------------------------------------------------------
# The op: the schema, the fake implementation and the autograd of the pair op (ops.py).
# ------------------------------------------------------------------------------------------------

_lib = torch.library.Library("rkkd", "FRAGMENT")
_lib.define("kendall_expsum" + ops.SCHEMA)
torch.library.register_fake(OP_NAME, ops.kendall_fake, lib=_lib)
ops.register_autograd_and_vmap(OP_NAME)
