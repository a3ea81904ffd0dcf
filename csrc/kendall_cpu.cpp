// The CPU kernel of rkkd::kendall: loss and both gradients in one pass over each row's pairs.
//
// Compiled once per ISA variant (cpu_variant.h), called by cpu_library.cpp.
//
// Rows are spread over torch's intra-op threads (at::parallel_for, through cpu_library.cpp). A row of C >= 4096 is cut into up to 8
// chunks of i, fixed by C alone, whose sums are added in chunk order: with at least as many rows
// as threads each row runs on one thread, chunk after chunk; with fewer, the chunks of a few rows
// run in parallel. Either way a row's bits are the same, whatever the batch or the thread count.
// Per thread: four length-C buffers (exp weights of student and teacher, two gradient sums) and
// the chunks' partial sums in double; O(threads * C) extra memory, O(rows * C) for the outputs,
// nothing of size C x C.
//
// The inner loop runs over j > i on SIMD vectors (GCC/Clang vector extensions, so the same pair
// functions of pair_math.h serve scalars and vectors); the last partial vector of each i is masked
// rather than finished by a scalar loop.
#include <algorithm>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "cpu_variant.h"
#include "pair_math.h"
#include "simd.h"

RKKD_NAMESPACE_BEGIN

using F32Vec = Vec<float>;
using F64Vec = Vec<double>;

// Vector arithmetic: a true division (on AVX2 cores as fast as a reciprocal estimate refined by a
// Newton step, measured, and exact; AVX-512 float differs, below), and sign() from lane masks (a
// comparison gives -1 or 0).
template <typename V, typename T>
struct VectorArith {
  static inline V reciprocal(V x) { return T(1) / x; }
  static inline V sign(V x) { return __builtin_convertvector((x < T(0)) - (x > T(0)), V); }
};
#if defined(__AVX512F__)
// AVX-512 float: the divider bounds the loop (vdivps zmm, 8 cycles per 16 lanes measured on an
// Emerald Rapids core; 4 of them per 32 pairs), so the reciprocal is the 14-bit estimate vrcp14ps
// refined by one Newton step, two FMAs on pipes that have room: within about an ulp, and 1.45x
// faster at B=256, C=1000 (docs/performance.md). Its arguments are normal numbers: a_i + a_j in
// [2 exp(-80), 2 exp(80)] (ratio form), e_i + e_j + 2 in [2/e, 2e] (small-spread form).
template <>
struct Arith<F32Vec> : VectorArith<F32Vec, float> {
  static inline F32Vec reciprocal(F32Vec x) {
    const F32Vec r = F32Vec(_mm512_rcp14_ps(__m512(x)));
    const F32Vec e = 1.0f - x * r;
    return r + r * e;
  }
};
#else
template <>
struct Arith<F32Vec> : VectorArith<F32Vec, float> {};
#endif
template <>
struct Arith<F64Vec> : VectorArith<F64Vec, double> {};

namespace {

// Buffers of one thread, reused across its rows. Each has `width` slack lanes so that the masked
// last vector of a row can read and write past C.
template <typename T>
struct RowBuffers {
  Buffer<T> student, teacher, grad_s, grad_t;
  void resize(int64_t padded) {
    for (auto* b : {&student, &teacher, &grad_s, &grad_t}) b->assign(padded, T(0));
  }
};

// tanh of a pair from the weights of the ratio form (kSmall false) or the small-spread form.
template <bool kSmall, typename V>
inline TanhPair<V> tanh_from_weights(V a_i, V a_j) {
  return kSmall ? tanh_from_expm1(a_i, a_j) : tanh_from_ratio(a_i, a_j);
}

template <typename V, bool kHard, bool kSmall>
inline PairTerms<V> ratio_pair(V a_i, V b_i, V a_j, V b_j) {
  const TanhPair<V> s = tanh_from_weights<kSmall>(a_i, a_j);
  return kHard ? hard_teacher_pair(s, Arith<V>::sign(b_i - b_j))
               : soft_teacher_pair(s, tanh_from_weights<kSmall>(b_i, b_j));
}

// The fast path: ratio form (or small-spread form, kSmall) on SIMD vectors. `a`, `b` hold the
// weights exp(2k (x - centre)) (kSmall: expm1) of student and teacher (for a hard teacher, `b`
// holds the teacher logits themselves), padded with weights of zero logits.
// Two rows i, i + 1 share each pass over j > i + 1: the loads of a_j, b_j and the read-modify-write
// of the j-side sums are paid once for two pairs.
//
// tau's lane sums cover the pairs of one pass over j (at most C / W terms a lane) and are added into
// a double once per pass: float lanes kept over a whole row sum ~C^2 / (2W) terms of size up to 1,
// which lost about 1e-5 of the loss (hard teacher, C = 1000, k = 8, student close to the teacher).
template <typename T, bool kSmall, bool kHard, bool kGradS, bool kGradT>
double ratio_row(const T* a, const T* b, int64_t c, int64_t i_begin, int64_t i_end, T* gs, T* gt) {
  using V = Vec<T>;
  constexpr int64_t W = sizeof(V) / sizeof(T);
  double tau = 0;
  for (int64_t i = i_begin; i < i_end && i + 1 < c; i += 2) {
    const int64_t i1 = i + 1;
    const PairTerms<T> own = ratio_pair<T, kHard, kSmall>(a[i], b[i], a[i1], b[i1]);
    V tau_v{};  // this pass's lane sums
    const V a_i = V{} + a[i], b_i = V{} + b[i];
    const V a_i1 = V{} + a[i1], b_i1 = V{} + b[i1];
    V gs_i{}, gt_i{}, gs_i1{}, gt_i1{};
    for (int64_t j = i + 2; j < c; j += W) {
      const V a_j = load<V>(a + j);
      const V b_j = load<V>(b + j);
      PairTerms<V> p = ratio_pair<V, kHard, kSmall>(a_i, b_i, a_j, b_j);
      PairTerms<V> p1 = ratio_pair<V, kHard, kSmall>(a_i1, b_i1, a_j, b_j);
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
      gs[i] += lane_sum(gs_i) + own.grad_s;
      gs[i1] += lane_sum(gs_i1) - own.grad_s;
    }
    if (kGradT) {
      gt[i] += lane_sum(gt_i) + own.grad_t;
      gt[i1] += lane_sum(gt_i1) - own.grad_t;
    }
    tau += double(lane_sum(tau_v) + own.tau);
  }
  return tau;
}

// The guarded path for rows whose spread overflows the ratio form: tanh of each pair, in double.
template <bool kHard>
double direct_row(const double* x, const double* y, int64_t c, int64_t i_begin, int64_t i_end,
                  double k, double* gs, double* gt) {
  double tau = 0;
  for (int64_t i = i_begin; i < i_end && i + 1 < c; ++i) {
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

// A row of at least kSplitColumns is cut into chunks of i (each with all its pairs j > i), so that
// batches of fewer rows than threads still keep every thread busy. The cut depends on C alone and
// the chunks' sums are added in chunk order, in double: a row's bits depend neither on the batch
// nor on the thread count. Below kSplitColumns a row is one chunk, as a row always was.
constexpr int64_t kSplitColumns = 4096;
constexpr int64_t kMaxChunks = 8;

int64_t num_chunks(int64_t c) {
  return c < kSplitColumns ? 1 : std::min<int64_t>(kMaxChunks, c / (kSplitColumns / 2));
}

// First i of chunk m of n, even (the two-row passes of ratio_row stay inside a chunk). The pairs
// with i < x number x (c - x / 2) roughly: each chunk gets an equal share of the triangle.
int64_t chunk_start(int64_t c, int64_t m, int64_t n) {
  if (m <= 0) return 0;
  if (m >= n) return c;
  const double x = double(c) * (1.0 - std::sqrt(1.0 - double(m) / double(n)));
  return std::min<int64_t>(c, static_cast<int64_t>(x) & ~int64_t(1));
}

// How a row is computed: its ranges, and its path (pair_math.h's choose_row_path).
struct RowPlan {
  RowRange rs, rt;
  RowPath path;
  bool small() const { return path == RowPath::kFloatSmall || path == RowPath::kDoubleSmall; }
  bool in_float() const { return path == RowPath::kFloatSmall || path == RowPath::kFloatRatio; }
};

// Not inlined: inside kendall_rows' loops GCC keeps row_range's minimum and maximum on the stack,
// a store and a load per element (measured: the row scan took 2.5 % of the B=256, C=1000 call).
template <typename scalar_t, typename acc_t>
[[gnu::noinline]] RowPlan plan_row(const scalar_t* s, const scalar_t* t, int64_t c, double k, bool hard) {
  RowPlan plan{row_range(s, c), row_range(t, c), RowPath::kDirect};
  plan.path = choose_row_path(plan.rs.finite && plan.rt.finite, k, plan.rs.spread(),
                              plan.rt.spread(), hard, !std::is_same<acc_t, double>::value);
  return plan;
}

// Fills a thread's weight buffers with one row: exp(2k (x - centre)) for the ratio form, expm1 of
// the same for the small-spread form (for a hard teacher, the teacher logits themselves), the
// logits for the direct form; padded with the weight of a zero argument (finite, and masked out).
template <typename T, typename scalar_t>
void load_row(const scalar_t* s, const scalar_t* t, int64_t c, double k, bool hard,
              const RowPlan& plan, RowBuffers<T>& buf) {
  const bool direct = plan.path == RowPath::kDirect, small = plan.small();
  const double two_k = 2.0 * k;
  // The argument is rounded to T first, as on the GPU.
  auto weight = [&](double x, double centre) {
    const T arg = T(two_k * (x - centre));
    return small ? T(std::expm1(arg)) : T(std::exp(arg));
  };
  for (int64_t i = 0; i < c; ++i) {
    const double x = static_cast<double>(s[i]), y = static_cast<double>(t[i]);
    buf.student[i] = direct ? T(x) : weight(x, plan.rs.centre());
    buf.teacher[i] = (direct || hard) ? T(y) : weight(y, plan.rt.centre());
  }
  const T padding = small ? T(0) : T(1);
  std::fill(buf.student.begin() + c, buf.student.end(), padding);
  std::fill(buf.teacher.begin() + c, buf.teacher.end(), padding);
}

// The fast path's loop for one chunk, with the gradients asked for compiled in.
template <typename T, bool kSmall>
double weighted_chunk(const T* a, const T* b, int64_t c, int64_t i_begin, int64_t i_end, bool hard,
                 bool want_s, bool want_t, T* gs, T* gt) {
  return hard ? (want_s ? ratio_row<T, kSmall, true, true, false>(a, b, c, i_begin, i_end, gs, gt)
                        : ratio_row<T, kSmall, true, false, false>(a, b, c, i_begin, i_end, gs, gt))
       : want_t ? (want_s ? ratio_row<T, kSmall, false, true, true>(a, b, c, i_begin, i_end, gs, gt)
                          : ratio_row<T, kSmall, false, false, true>(a, b, c, i_begin, i_end, gs, gt))
                : (want_s ? ratio_row<T, kSmall, false, true, false>(a, b, c, i_begin, i_end, gs, gt)
                          : ratio_row<T, kSmall, false, false, false>(a, b, c, i_begin, i_end, gs, gt));
}

// One chunk of the row in the weight buffers: its unscaled sums, tau returned, the gradient sums
// into the partial rows gs_out, gt_out (length C, in double; null when not asked for).
template <typename T>
double chunk_sums(int64_t c, double k, bool hard, const RowPlan& plan, int64_t i_begin,
                  int64_t i_end, RowBuffers<T>& buf, double* gs_out, double* gt_out) {
  std::fill(buf.grad_s.begin(), buf.grad_s.end(), T(0));
  std::fill(buf.grad_t.begin(), buf.grad_t.end(), T(0));
  const T* a = buf.student.data();
  const T* b = buf.teacher.data();
  T* gs = buf.grad_s.data();
  T* gt = buf.grad_t.data();
  // Each gradient's sums only when asked for (a distillation teacher is usually detached; an
  // evaluation asks for none) and, for the teacher, not identically zero: without them the
  // compiler drops their multiplies, loads and stores.
  const bool want_s = gs_out != nullptr, want_t = gt_out != nullptr && !hard;
  double tau;
  if (plan.path == RowPath::kDirect) {
    if constexpr (std::is_same<T, double>::value) {
      tau = hard ? direct_row<true>(a, b, c, i_begin, i_end, k, gs, gt)
                 : direct_row<false>(a, b, c, i_begin, i_end, k, gs, gt);
    } else {
      std::abort();  // unreachable: choose_row_path computes the direct path in double only
    }
  } else if (plan.small()) {
    tau = weighted_chunk<T, true>(a, b, c, i_begin, i_end, hard, want_s, want_t, gs, gt);
  } else {
    tau = weighted_chunk<T, false>(a, b, c, i_begin, i_end, hard, want_s, want_t, gs, gt);
  }
  if (gs_out) std::copy(gs, gs + c, gs_out);
  if (gt_out) std::copy(gt, gt + c, gt_out);
  return tau;
}

// The thread's buffers for both compute types, sized at first use: load a row once, then run any
// of its chunks.
struct ThreadBuffers {
  RowBuffers<float> f;
  RowBuffers<double> d;
  int64_t padded;
  explicit ThreadBuffers(int64_t c) : padded(c + kVectorBytes / int64_t(sizeof(float))) {}

  template <typename scalar_t>
  void load(const scalar_t* s, const scalar_t* t, int64_t c, double k, bool hard,
            const RowPlan& plan) {
    if (plan.in_float()) {
      if (f.student.empty()) f.resize(padded);
      load_row(s, t, c, k, hard, plan, f);
    } else {
      if (d.student.empty()) d.resize(padded);
      load_row(s, t, c, k, hard, plan, d);
    }
  }

  double chunk(int64_t c, double k, bool hard, const RowPlan& plan, int64_t i_begin,
               int64_t i_end, double* gs, double* gt) {
    return plan.in_float()
               ? chunk_sums(c, k, hard, plan, i_begin, i_end, f, gs, gt)
               : chunk_sums(c, k, hard, plan, i_begin, i_end, d, gs, gt);
  }
};

// Loss and scaled gradients of a row from its chunks' sums, added in chunk order.
template <typename acc_t>
void finish_row(int64_t c, double k, bool hard, const RowPlan& plan, int64_t n,
                const double* taus, const double* gs_parts, const double* gt_parts, acc_t* loss,
                acc_t* grad_s, acc_t* grad_t) {
  if (plan.path == RowPath::kNonFinite) {
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    *loss = nan;
    if (grad_s) std::fill(grad_s, grad_s + c, nan);
    if (grad_t) std::fill(grad_t, grad_t + c, hard ? acc_t(0) : nan);
    return;
  }
  const RowScale<double> scale(c, k);
  double tau = taus[0];
  for (int64_t m = 1; m < n; ++m) tau += taus[m];
  *loss = acc_t(scale.loss(tau));
  auto scaled_sums = [&](const double* parts, acc_t* out) {
    for (int64_t i = 0; i < c; ++i) {
      double sum = parts[i];
      for (int64_t m = 1; m < n; ++m) sum += parts[m * c + i];
      out[i] = acc_t(scale.grad_scale * sum);
    }
  };
  if (grad_s) scaled_sums(gs_parts, grad_s);
  if (grad_t) {
    if (hard) {
      std::fill(grad_t, grad_t + c, acc_t(0));
    } else {
      scaled_sums(gt_parts, grad_t);
    }
  }
}

// Where one row's partial sums live: n taus, n partial rows per gradient asked for.
struct RowParts {
  double* taus;
  double* gs;
  double* gt;
};

template <typename scalar_t, typename acc_t>
void kendall_rows(const scalar_t* s, const scalar_t* t, int64_t rows, int64_t c, double k,
                  bool hard, acc_t* loss, acc_t* grad_s, acc_t* grad_t) {
  const int64_t n = num_chunks(c);
  const bool want_s = grad_s != nullptr, want_t = grad_t != nullptr && !hard;
  auto row_parts = [&](Buffer<double>& store, int64_t slot) {
    const int64_t per_row = n + (want_s ? n * c : 0) + (want_t ? n * c : 0);
    if (int64_t(store.size()) < (slot + 1) * per_row) store.resize((slot + 1) * per_row);
    double* base = store.data() + slot * per_row;
    double* gs = want_s ? base + n : nullptr;
    double* gt = want_t ? base + n + (want_s ? n * c : 0) : nullptr;
    return RowParts{base, gs, gt};
  };
  auto finish = [&](int64_t r, const RowPlan& plan, const RowParts& p) {
    finish_row(c, k, hard, plan, n, p.taus, p.gs, p.gt, loss + r,
               grad_s ? grad_s + r * c : nullptr, grad_t ? grad_t + r * c : nullptr);
  };

  if (n == 1 || rows >= num_threads()) {
    // Enough rows for every thread: each row on one thread, its chunks one after the other.
    parallel_rows(0, rows, 1, [&](int64_t begin, int64_t end) {
      ThreadBuffers buffers(c);
      Buffer<double> store;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* s_row = s + r * c;
        const scalar_t* t_row = t + r * c;
        const RowPlan plan = plan_row<scalar_t, acc_t>(s_row, t_row, c, k, hard);
        const RowParts p = row_parts(store, 0);
        if (plan.path != RowPath::kNonFinite) {
          buffers.load(s_row, t_row, c, k, hard, plan);
          for (int64_t m = 0; m < n; ++m) {
            p.taus[m] = buffers.chunk(c, k, hard, plan, chunk_start(c, m, n), chunk_start(c, m + 1, n),
                                      p.gs ? p.gs + m * c : nullptr, p.gt ? p.gt + m * c : nullptr);
          }
        }
        finish(r, plan, p);
      }
    });
    return;
  }
  // Fewer rows than threads: the (row, chunk) pieces of a group of rows run in parallel, then the
  // rows are finished; a group is as many rows as keep the threads busy, to bound the partials.
  const int64_t group = std::max<int64_t>(1, (num_threads() + n - 1) / n);
  Buffer<double> store;
  Buffer<RowPlan> plans(std::min(group, rows));
  for (int64_t first = 0; first < rows; first += group) {
    const int64_t count = std::min(group, rows - first);
    for (int64_t g = 0; g < count; ++g) {
      plans[g] = plan_row<scalar_t, acc_t>(s + (first + g) * c, t + (first + g) * c, c, k, hard);
      row_parts(store, g);  // sized here, outside the parallel region
    }
    parallel_rows(0, count * n, 1, [&](int64_t begin, int64_t end) {
      ThreadBuffers buffers(c);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t g = item / n, m = item % n;
        if (plans[g].path == RowPath::kNonFinite) continue;
        const RowParts p = row_parts(store, g);
        // Each piece may land on another thread: each loads its row (O(C) beside O(C^2 / n)).
        buffers.load(s + (first + g) * c, t + (first + g) * c, c, k, hard, plans[g]);
        p.taus[m] = buffers.chunk(c, k, hard, plans[g], chunk_start(c, m, n), chunk_start(c, m + 1, n),
                                  p.gs ? p.gs + m * c : nullptr, p.gt ? p.gt + m * c : nullptr);
      }
    });
    parallel_rows(0, count, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) finish(first + g, plans[g], row_parts(store, g));
    });
  }
}

}  // namespace

void kendall_pairs(const KendallArgs& a) {
  dispatch_input_type(a.type, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    kendall_rows<scalar_t, acc_t>(static_cast<const scalar_t*>(a.student),
                                  static_cast<const scalar_t*>(a.teacher), a.rows, a.c, a.k,
                                  a.hard_teacher, static_cast<acc_t*>(a.loss),
                                  static_cast<acc_t*>(a.grad_student),
                                  static_cast<acc_t*>(a.grad_teacher));
  });
}

// This variant's entry points, which cpu_library.cpp looks up by the variant's namespace.
extern const CpuVariant kVariant;
const CpuVariant kVariant = {&kendall_pairs, &kendall_expsum};

RKKD_NAMESPACE_END
