// The exponential-sum method of the hard-teacher loss: the node lattice and the row's scale factors,
// callable on host and device. The derivation, the error bounds and the one definition of the
// lattice's numbers are in rkkd_kernels/expsum.py; this file holds the same three numbers per
// precision (step, cut, max_spread) and derives the node range from them the same way.
//
// Per row, sorted by teacher logit (descending, stable), with b_i = 2k (s_i - c), c = (max + min) / 2,
// and nodes t_m = m * step for m_lo <= m <= m_hi:
//   y_m,i = exp(t_m + b_i),  E = exp(-y),  F = y * E
//   P tau       = N_untied - 2 step sum_m sum_q F_m,q prefE_m(q)
//   d(P tau)/ds = 4 k step sum_m F_m,x (sufF_m(x) - prefF_m(x))
// (prefix and suffix over the tie groups strictly before and after x's group).
#pragma once

#include "namespace.h"

#include <cmath>
#include <cstdint>

#include "pair_math.h"  // RKKD_HOST_DEVICE

RKKD_NAMESPACE_BEGIN

template <typename T>
struct ExpsumLattice;
template <>
struct ExpsumLattice<float> {
  static constexpr double step = 7.0 / 16.0;
  static constexpr double cut = 1e-8;
  static constexpr double max_spread = 80.0;
};
template <>
struct ExpsumLattice<double> {
  static constexpr double step = 9.0 / 32.0;
  static constexpr double cut = 1e-14;
  static constexpr double max_spread = 700.0;
};

// t_lo = lead - kR: the dropped left tail, x_max h sum_{t_m < t_lo} e^{t_m} = 2 e^{kR} h e^{t_lo - h}
// / (1 - e^{-h}), is at most `cut`.
RKKD_HOST_DEVICE double expsum_lead(double step, double cut) {
  return std::log(cut * (1.0 - std::exp(-step)) / (2.0 * step));
}

// t_hi = tail + kR, with v = x_min e^{t_hi} where h v^2 e^{-v} + (1 + v) e^{-v} = cut (the 1/x^2
// tail, decreasing for v > 2): found by bisection.
RKKD_HOST_DEVICE double expsum_tail(double step, double cut) {
  double lo = 2.0, hi = 800.0;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    if ((step * mid * mid + 1.0 + mid) * std::exp(-mid) <= cut) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return std::log(hi / 2.0);
}

struct NodeRange {
  int64_t first;  // m_lo
  int64_t count;  // m_hi - m_lo + 1
};

RKKD_HOST_DEVICE NodeRange expsum_nodes(double spread, double step, double lead, double tail) {
  const int64_t m_lo = static_cast<int64_t>(std::floor((lead - spread) / step)) + 1;
  const int64_t m_hi = static_cast<int64_t>(std::ceil((tail + spread) / step)) - 1;
  return {m_lo, m_hi - m_lo + 1};
}

// Loss and gradient of a row from its sums: loss = 1 - tau = (tied + 2 h S) / P with S the sum of
// F * prefE (every part positive: no cancellation even where the loss is tiny), and
// d loss / ds = -(4 k h / P) * (suffix part - prefix part).
struct ExpsumScale {
  double inv_pairs, step, grad_scale;
  RKKD_HOST_DEVICE ExpsumScale(int64_t c, double k, double h)
      : inv_pairs(2.0 / (double(c) * double(c - 1))), step(h), grad_scale(-4.0 * k * h * inv_pairs) {}
  RKKD_HOST_DEVICE double loss(int64_t tied_pairs, double f_pref_e) const {
    return (double(tied_pairs) + 2.0 * step * f_pref_e) * inv_pairs;
  }
};

RKKD_NAMESPACE_END
