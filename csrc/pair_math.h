// The pair terms of the soft-Kendall loss: the one copy of the math, for host code (scalar or SIMD
// vectors) and CUDA device code alike.
//
// For a row with student s, teacher t, steepness k and P = C (C - 1) / 2 pairs:
//   loss          = 1 - tau,  tau = (1 / P) sum_{i<j} tanh(k (s_i - s_j)) w_ij
//   d loss / ds_i = -(4 k / P) * G_i,   G_i = sum_{j != i} sign(j > i ? +1 : -1) * grad_s(i, j)
//   d loss / dt_i = -(4 k / P) * H_i    (the same with grad_t; zero for a hard teacher)
// where grad_s(i, j) = (1 - tanh_s^2) / 4 * w_ij and grad_t(i, j) = tanh_s * (1 - w_ij^2) / 4 are
// computed once per unordered pair (i < j): i adds them, j subtracts them (the summand is
// antisymmetric in the derivative), so each pair is visited once.
//
// Three ways to get tanh of a pair, each returning tanh and (1 - tanh^2) / 4; choose_row_path
// below picks one per row from k R, R = max - min of the row:
// - the ratio form, used on almost every row: with a_i = exp(2 k (x_i - c)) computed once per
//   element, tanh(k (x_i - x_j)) = (a_i - a_j) / (a_i + a_j): one reciprocal per pair, no exp.
//   The row centre c = (max + min) / 2 keeps every a_i in [exp(-k R), exp(k R)], so the form has
//   no overflow while k R stays under RatioLimits<T>::max_spread. Its tanh is exact to a few ulps
//   of 1, not of tanh itself: where k R is small, a_i - a_j is the difference of two numbers near 1;
// - the small-spread form, for rows of k R <= kSmallSpreadMax: with e_i = expm1(2 k (x_i - c)),
//   tanh = (e_i - e_j) / (e_i + e_j + 2), exact relative to the row's largest tanh however small k
//   is. Only there: e_i near -1 (large spreads) would lose 1 + e_i to cancellation;
// - the direct form tanh(k (x_i - x_j)), for rows beyond the ratio form (the guarded slow path).
#pragma once

#include "namespace.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RKKD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define RKKD_HOST_DEVICE inline
#endif

RKKD_NAMESPACE_BEGIN

// Largest k * (max - min) of a row for which every a_i = exp(+-k R) is a normal number and a_i + a_j
// cannot overflow (float: exp(87.3) is the smallest normal's reciprocal; double: exp(708)).
template <typename T>
struct RatioLimits;
template <>
struct RatioLimits<float> {
  static constexpr float max_spread = 80.0f;
};
template <>
struct RatioLimits<double> {
  static constexpr double max_spread = 700.0;
};

// The arithmetic that differs by type. Scalars get plain operators; a SIMD translation unit
// specializes this for its vector types (for example a reciprocal estimate refined by Newton).
template <typename T>
struct Arith {
  static RKKD_HOST_DEVICE T reciprocal(T x) { return T(1) / x; }
  // sign(x) with sign(0) = 0, the hard teacher's weight.
  static RKKD_HOST_DEVICE T sign(T x) { return T((x > T(0)) - (x < T(0))); }
};

#if defined(__CUDA_ARCH__)
template <>
struct Arith<float> {
  // The hardware reciprocal, rcp.approx: one MUFU instruction, at most 1 ulp off over the whole
  // range (PTX ISA), as accurate as the CPU's 12-bit SIMD estimate after its Newton step. The ratio
  // form takes two reciprocals per pair: a Newton step would add four FMAs to a pair's ~20
  // instructions (SASS of the sm_90 build), and the correctly rounded __frcp_rn is emulated with
  // refinement and a range test on top. The .ftz flush cannot apply: the ratio form only takes
  // reciprocals of a_i + a_j in [2 exp(-80), 2 exp(80)], normal numbers.
  static __device__ __forceinline__ float reciprocal(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
  }
  static __device__ __forceinline__ float sign(float x) { return float((x > 0.f) - (x < 0.f)); }
};
#endif

// The largest k * (max - min) of a row that takes the small-spread form: every e_i then lies in
// [expm1(-1), expm1(1)], so 1 + e_i is in [1/e, e] and keeps its relative precision.
constexpr double kSmallSpreadMax = 1.0;

// How a row is computed: the one rule, for every kernel (the Triton kernel, which cannot include
// this file, keeps a copy that cites it).
enum class RowPath : int32_t {
  kNonFinite = 0,  // a logit is NaN or infinite: the row's loss and gradients are NaN
  kFloatSmall,     // small-spread form, in float
  kFloatRatio,     // ratio form, in float
  kDoubleSmall,    // small-spread form, in double
  kDoubleRatio,    // ratio form, in double
  kDirect,         // direct form, in double
};

// k_spread = k * max(R_student, R_teacher); a hard teacher's spread does not count (its weights
// are signs). float_compute: the accumulation type is float (float, half and bfloat16 inputs).
// A float row whose spread overflows the float ratio form is computed in double.
RKKD_HOST_DEVICE RowPath choose_row_path(bool finite, double k, double spread_student,
                                         double spread_teacher, bool hard, bool float_compute) {
  if (!finite) return RowPath::kNonFinite;
  const double k_spread =
      k * (hard || spread_student >= spread_teacher ? spread_student : spread_teacher);
  if (k_spread <= kSmallSpreadMax) return float_compute ? RowPath::kFloatSmall : RowPath::kDoubleSmall;
  if (float_compute && k_spread <= RatioLimits<float>::max_spread) return RowPath::kFloatRatio;
  if (k_spread <= RatioLimits<double>::max_spread) return RowPath::kDoubleRatio;
  return RowPath::kDirect;
}

// The centre (max + min) / 2 of a row, halves first: hi + lo overflows for rows near the type's
// largest value (1.7e308 + 1.69e308 is inf in double).
RKKD_HOST_DEVICE double row_centre(double lo, double hi) { return 0.5 * hi + 0.5 * lo; }

// A row's smallest and largest value (in double) and whether all of it is finite: what the CPU
// kernels read before they choose a row's path (host code; the CUDA kernel reduces on the GPU).
struct RowRange {
  double lo = std::numeric_limits<double>::infinity();
  double hi = -std::numeric_limits<double>::infinity();
  bool finite = true;
  double spread() const { return hi - lo; }
  double centre() const { return row_centre(lo, hi); }
};

template <typename scalar_t>
inline RowRange row_range(const scalar_t* x, int64_t c) {
  RowRange r;
  for (int64_t i = 0; i < c; ++i) {
    const double v = static_cast<double>(x[i]);
    r.finite = r.finite && std::isfinite(v);
    r.lo = std::min(r.lo, v);
    r.hi = std::max(r.hi, v);
  }
  return r;
}

template <typename T>
struct TanhPair {
  T tanh;           // tanh(k (x_i - x_j))
  T quarter_sech2;  // (1 - tanh^2) / 4
};

// Ratio form: p = a_i / (a_i + a_j) and q = a_j / (a_i + a_j) both lie in [0, 1], so tanh = p - q
// and (1 - tanh^2) / 4 = p q, with no cancellation where tanh saturates and nothing to overflow.
template <typename T>
RKKD_HOST_DEVICE TanhPair<T> tanh_from_ratio(T a_i, T a_j) {
  const T inv = Arith<T>::reciprocal(a_i + a_j);
  const T p = a_i * inv;
  const T q = a_j * inv;
  return {p - q, p * q};
}

// Small-spread form: e = expm1(2k (x - centre)). The rows that take it have |tanh| <= tanh(1), so
// 1 - tanh^2 >= 0.41 has no cancellation. `e_i + e_j + 2` works on SIMD vectors as on scalars.
template <typename T>
RKKD_HOST_DEVICE TanhPair<T> tanh_from_expm1(T e_i, T e_j) {
  const T inv = Arith<T>::reciprocal(e_i + e_j + 2);
  const T th = (e_i - e_j) * inv;
  return {th, (1 - th * th) * 0.25f};
}

// Direct form, for the guarded path: x = k (x_i - x_j).
template <typename T>
RKKD_HOST_DEVICE TanhPair<T> tanh_direct(T x) {
  using std::tanh;
  const T th = tanh(x);
  return {th, (T(1) - th) * (T(1) + th) * T(0.25)};
}

template <typename T>
struct PairTerms {
  T tau;     // this pair's share of P * tau
  T grad_s;  // added to G_i, subtracted from G_j
  T grad_t;  // added to H_i, subtracted from H_j
};

template <typename T>
RKKD_HOST_DEVICE PairTerms<T> soft_teacher_pair(const TanhPair<T>& s, const TanhPair<T>& t) {
  return {s.tanh * t.tanh, s.quarter_sech2 * t.tanh, s.tanh * t.quarter_sech2};
}

// Hard teacher: w_ij = sign(t_i - t_j) and the teacher gets no gradient.
template <typename T>
RKKD_HOST_DEVICE PairTerms<T> hard_teacher_pair(const TanhPair<T>& s, T sign_t) {
  return {s.tanh * sign_t, s.quarter_sech2 * sign_t, T{}};
}

// The factors that turn the accumulated sums into the loss and the gradients.
template <typename T>
struct RowScale {
  T inv_pairs;   // 1 / P
  T grad_scale;  // -4 k / P
  RKKD_HOST_DEVICE RowScale(int64_t c, double k)
      : inv_pairs(T(2.0 / (double(c) * double(c - 1)))),
        grad_scale(T(-8.0 * k / (double(c) * double(c - 1)))) {}
  RKKD_HOST_DEVICE T loss(T tau_sum) const { return T(1) - tau_sum * inv_pairs; }
};

RKKD_NAMESPACE_END
