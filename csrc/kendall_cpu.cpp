// The CPU kernel of rkkd::kendall: loss and both gradients in one pass over each row's pairs.
//
// Rows are spread over torch's intra-op threads (OpenMP); each row is computed by one thread in a
// fixed order, so results are bitwise reproducible whatever the thread count. Per row the thread
// keeps four length-C buffers (exp weights of student and teacher, two gradient sums): O(C) extra
// memory per thread, O(rows * C) for the outputs, nothing of size C x C.
//
// The inner loop runs over j > i on SIMD vectors (GCC/Clang vector extensions, so the same pair
// functions of pair_math.h serve scalars and vectors); the last partial vector of each i is masked
// rather than finished by a scalar loop.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "kendall_op.h"
#include "pair_math.h"

namespace rkkd {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif
typedef float F32Vec __attribute__((vector_size(kVectorBytes)));
typedef double F64Vec __attribute__((vector_size(kVectorBytes)));

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = F32Vec;
};
template <>
struct VecOf<double> {
  using type = F64Vec;
};

// Vector arithmetic: a true division (on these cores as fast as a reciprocal estimate refined by a
// Newton step, measured, and exact), and sign() from lane masks (a comparison gives -1 or 0).
template <typename V, typename T>
struct VectorArith {
  static inline V reciprocal(V x) { return T(1) / x; }
  static inline V sign(V x) { return __builtin_convertvector((x < T(0)) - (x > T(0)), V); }
};
template <>
struct Arith<F32Vec> : VectorArith<F32Vec, float> {};
template <>
struct Arith<F64Vec> : VectorArith<F64Vec, double> {};

namespace {

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Sum of a vector's lanes by halving (log2(width) steps), not lane after lane: this runs once per
// i, so a serial chain of width - 1 dependent adds would cost as much as a short j loop. Shuffles,
// not memcpy, so that the accumulators stay in registers.
template <typename Half, typename V, size_t... I>
inline Half fold_halves(V v, std::index_sequence<I...>) {
  return __builtin_shufflevector(v, v, I...) + __builtin_shufflevector(v, v, (I + sizeof...(I))...);
}

template <typename V>
inline auto horizontal_sum(V v) -> typename std::remove_reference<decltype(v[0])>::type {
  using T = typename std::remove_reference<decltype(v[0])>::type;
  constexpr size_t kLanes = sizeof(V) / sizeof(T);
  if constexpr (kLanes == 1) {
    return v[0];
  } else {
    typedef T Half __attribute__((vector_size(sizeof(V) / 2)));
    return horizontal_sum(fold_halves<Half>(v, std::make_index_sequence<kLanes / 2>{}));
  }
}

// Buffers of one thread, reused across its rows. Each has `width` slack lanes so that the masked
// last vector of a row can read and write past C.
template <typename T>
struct RowBuffers {
  std::vector<T> student, teacher, grad_s, grad_t;
  void resize(int64_t padded) {
    for (auto* b : {&student, &teacher, &grad_s, &grad_t}) b->assign(padded, T(0));
  }
};

template <typename V, bool kHard>
inline PairTerms<V> ratio_pair(V a_i, V b_i, V a_j, V b_j) {
  const TanhPair<V> s = tanh_from_ratio(a_i, a_j);
  return kHard ? hard_teacher_pair(s, Arith<V>::sign(b_i - b_j))
               : soft_teacher_pair(s, tanh_from_ratio(b_i, b_j));
}

// The fast path: ratio form on SIMD vectors. `a`, `b` hold exp(2k (x - centre)) of student and
// teacher (for a hard teacher, `b` holds the teacher logits themselves), padded with ones.
// Two rows i, i + 1 share each pass over j > i + 1: the loads of a_j, b_j and the read-modify-write
// of the j-side sums are paid once for two pairs.
template <typename T, bool kHard, bool kGradS, bool kGradT>
T ratio_row(const T* a, const T* b, int64_t c, T* gs, T* gt) {
  using V = typename VecOf<T>::type;
  constexpr int64_t W = sizeof(V) / sizeof(T);
  V tau_v{};  // lane sums over the whole row, added up once at the end
  T tau = 0;
  for (int64_t i = 0; i + 1 < c; i += 2) {
    const int64_t i1 = i + 1;
    const PairTerms<T> own = ratio_pair<T, kHard>(a[i], b[i], a[i1], b[i1]);
    tau += own.tau;
    const V a_i = V{} + a[i], b_i = V{} + b[i];
    const V a_i1 = V{} + a[i1], b_i1 = V{} + b[i1];
    V gs_i{}, gt_i{}, gs_i1{}, gt_i1{};
    for (int64_t j = i + 2; j < c; j += W) {
      const V a_j = load<V>(a + j);
      const V b_j = load<V>(b + j);
      PairTerms<V> p = ratio_pair<V, kHard>(a_i, b_i, a_j, b_j);
      PairTerms<V> p1 = ratio_pair<V, kHard>(a_i1, b_i1, a_j, b_j);
      if (j + W > c) {  // the last, partial vector: lanes past C contribute nothing
        V mask{};
        for (int64_t l = 0; l < c - j; ++l) mask[l] = T(1);
        for (PairTerms<V>* q : {&p, &p1}) {
          q->tau *= mask;
          q->grad_s *= mask;
          q->grad_t *= mask;
        }
      }
      tau_v += p.tau + p1.tau;
      if (kGradS) {
        gs_i += p.grad_s;
        gs_i1 += p1.grad_s;
        store(gs + j, load<V>(gs + j) - (p.grad_s + p1.grad_s));
      }
      if (kGradT) {
        gt_i += p.grad_t;
        gt_i1 += p1.grad_t;
        store(gt + j, load<V>(gt + j) - (p.grad_t + p1.grad_t));
      }
    }
    if (kGradS) {
      gs[i] += horizontal_sum(gs_i) + own.grad_s;
      gs[i1] += horizontal_sum(gs_i1) - own.grad_s;
    }
    if (kGradT) {
      gt[i] += horizontal_sum(gt_i) + own.grad_t;
      gt[i1] += horizontal_sum(gt_i1) - own.grad_t;
    }
  }
  return horizontal_sum(tau_v) + tau;
}

// The guarded path for rows whose spread overflows the ratio form: tanh of each pair, in double.
template <bool kHard>
double direct_row(const double* x, const double* y, int64_t c, double k, double* gs, double* gt) {
  double tau = 0;
  for (int64_t i = 0; i + 1 < c; ++i) {
    for (int64_t j = i + 1; j < c; ++j) {
      const TanhPair<double> s = tanh_direct(k * (x[i] - x[j]));
      const PairTerms<double> p = kHard
          ? hard_teacher_pair(s, Arith<double>::sign(y[i] - y[j]))
          : soft_teacher_pair(s, tanh_direct(k * (y[i] - y[j])));
      tau += p.tau;
      gs[i] += p.grad_s;
      gs[j] -= p.grad_s;
      gt[i] += p.grad_t;
      gt[j] -= p.grad_t;
    }
  }
  return tau;
}

struct Range {
  double lo = std::numeric_limits<double>::infinity();
  double hi = -std::numeric_limits<double>::infinity();
  bool finite = true;
  double spread() const { return hi - lo; }
  double centre() const { return 0.5 * (hi + lo); }
};

template <typename scalar_t>
Range row_range(const scalar_t* x, int64_t c) {
  Range r;
  for (int64_t i = 0; i < c; ++i) {
    const double v = static_cast<double>(x[i]);
    r.finite = r.finite && std::isfinite(v);
    r.lo = std::min(r.lo, v);
    r.hi = std::max(r.hi, v);
  }
  return r;
}

// One row: choose the path, run it, write loss and scaled gradients in the output type acc_t.
template <typename T, typename scalar_t, typename acc_t>
void ratio_path(const scalar_t* s, const scalar_t* t, int64_t c, double k, bool hard,
                const Range& rs, const Range& rt, RowBuffers<T>& buf, acc_t* loss,
                acc_t* grad_s, acc_t* grad_t) {
  const double two_k = 2.0 * k;
  for (int64_t i = 0; i < c; ++i) {
    buf.student[i] = T(std::exp(T(two_k * (static_cast<double>(s[i]) - rs.centre()))));
    buf.teacher[i] = hard ? T(static_cast<double>(t[i]))
                          : T(std::exp(T(two_k * (static_cast<double>(t[i]) - rt.centre()))));
  }
  const int64_t padded = static_cast<int64_t>(buf.student.size());
  std::fill(buf.student.begin() + c, buf.student.end(), T(1));
  std::fill(buf.teacher.begin() + c, buf.teacher.end(), T(1));
  std::fill(buf.grad_s.begin(), buf.grad_s.begin() + padded, T(0));
  std::fill(buf.grad_t.begin(), buf.grad_t.begin() + padded, T(0));
  // Each gradient's sums only when asked for (a distillation teacher is usually detached; an
  // evaluation asks for none) and, for the teacher, not identically zero: without them the
  // compiler drops their multiplies, loads and stores.
  const T* a = buf.student.data();
  const T* b = buf.teacher.data();
  T* gs = buf.grad_s.data();
  T* gt = buf.grad_t.data();
  const bool want_s = grad_s != nullptr, want_t = grad_t != nullptr && !hard;
  const T tau = hard ? (want_s ? ratio_row<T, true, true, false>(a, b, c, gs, gt)
                               : ratio_row<T, true, false, false>(a, b, c, gs, gt))
              : want_t ? (want_s ? ratio_row<T, false, true, true>(a, b, c, gs, gt)
                                 : ratio_row<T, false, false, true>(a, b, c, gs, gt))
                       : (want_s ? ratio_row<T, false, true, false>(a, b, c, gs, gt)
                                 : ratio_row<T, false, false, false>(a, b, c, gs, gt));
  const RowScale<double> scale(c, k);
  *loss = acc_t(scale.loss(double(tau)));
  if (grad_s)
    for (int64_t i = 0; i < c; ++i) grad_s[i] = acc_t(scale.grad_scale * double(buf.grad_s[i]));
  if (grad_t)
    for (int64_t i = 0; i < c; ++i)
      grad_t[i] = hard ? acc_t(0) : acc_t(scale.grad_scale * double(buf.grad_t[i]));
}

template <typename scalar_t, typename acc_t>
void direct_path(const scalar_t* s, const scalar_t* t, int64_t c, double k, bool hard,
                 RowBuffers<double>& buf, acc_t* loss, acc_t* grad_s, acc_t* grad_t) {
  for (int64_t i = 0; i < c; ++i) {
    buf.student[i] = static_cast<double>(s[i]);
    buf.teacher[i] = static_cast<double>(t[i]);
  }
  std::fill(buf.grad_s.begin(), buf.grad_s.end(), 0.0);
  std::fill(buf.grad_t.begin(), buf.grad_t.end(), 0.0);
  const double tau = hard ? direct_row<true>(buf.student.data(), buf.teacher.data(), c, k,
                                             buf.grad_s.data(), buf.grad_t.data())
                          : direct_row<false>(buf.student.data(), buf.teacher.data(), c, k,
                                              buf.grad_s.data(), buf.grad_t.data());
  const RowScale<double> scale(c, k);
  *loss = acc_t(scale.loss(tau));
  if (grad_s)
    for (int64_t i = 0; i < c; ++i) grad_s[i] = acc_t(scale.grad_scale * buf.grad_s[i]);
  if (grad_t)
    for (int64_t i = 0; i < c; ++i) grad_t[i] = acc_t(scale.grad_scale * buf.grad_t[i]);
}

template <typename scalar_t, typename acc_t>
void kendall_rows(const scalar_t* s, const scalar_t* t, int64_t rows, int64_t c, double k,
                  bool hard, acc_t* loss, acc_t* grad_s, acc_t* grad_t) {
  constexpr bool kFloatCompute = !std::is_same<acc_t, double>::value;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    constexpr int64_t kSlack = kVectorBytes / sizeof(float);
    RowBuffers<float> fbuf;
    RowBuffers<double> dbuf;
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s_row = s + r * c;
      const scalar_t* t_row = t + r * c;
      acc_t* gs_row = grad_s ? grad_s + r * c : nullptr;
      acc_t* gt_row = grad_t ? grad_t + r * c : nullptr;
      const Range rs = row_range(s_row, c);
      const Range rt = row_range(t_row, c);
      if (!rs.finite || !rt.finite) {  // SPEC: a non-finite logit makes its row NaN, never 0
        const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
        loss[r] = nan;
        if (gs_row) std::fill(gs_row, gs_row + c, nan);
        if (gt_row) std::fill(gt_row, gt_row + c, hard ? acc_t(0) : nan);
        continue;
      }
      const double spread = k * std::max(rs.spread(), hard ? 0.0 : rt.spread());
      if (kFloatCompute && spread <= RatioLimits<float>::max_spread) {
        if (fbuf.student.size() == 0) fbuf.resize(c + kSlack);
        ratio_path<float>(s_row, t_row, c, k, hard, rs, rt, fbuf, loss + r, gs_row, gt_row);
      } else if (spread <= RatioLimits<double>::max_spread) {
        if (dbuf.student.size() == 0) dbuf.resize(c + kSlack);
        ratio_path<double>(s_row, t_row, c, k, hard, rs, rt, dbuf, loss + r, gs_row, gt_row);
      } else {
        if (dbuf.student.size() == 0) dbuf.resize(c + kSlack);
        direct_path(s_row, t_row, c, k, hard, dbuf, loss + r, gs_row, gt_row);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kendall_cpu(const at::Tensor& student,
                                                           const at::Tensor& teacher, double k,
                                                           bool hard_teacher, bool need_grad_s,
                                                           bool need_grad_t) {
  check_kendall_inputs(student, teacher, k);
  const at::Tensor s = student.contiguous();
  const at::Tensor t = teacher.contiguous();
  const int64_t rows = s.size(0), c = s.size(1);
  at::Tensor loss, grad_s, grad_t;
  std::tie(loss, grad_s, grad_t) = allocate_outputs(s, need_grad_s, need_grad_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "rkkd_kendall_cpu", [&] {
    using acc_t = accumulate_t<scalar_t>;
    kendall_rows<scalar_t, acc_t>(s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), rows, c, k,
                                  hard_teacher, loss.data_ptr<acc_t>(),
                                  need_grad_s ? grad_s.data_ptr<acc_t>() : nullptr,
                                  need_grad_t ? grad_t.data_ptr<acc_t>() : nullptr);
  });
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace rkkd

TORCH_LIBRARY_IMPL(rkkd, CPU, m) { m.impl("kendall", &rkkd::kendall_cpu); }
