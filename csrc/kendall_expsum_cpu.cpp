// The CPU kernel of rkkd::kendall_expsum: the hard-teacher loss and the student's gradient in
// O(C log C + C M) per row (the method and its error: rkkd_kernels/expsum.py; the lattice:
// expsum.h).
//
// Per row: a stable radix sort by teacher logit (descending), then two scans along that order with
// the M nodes on SIMD lanes, so that every node's running sum is a lane of a running vector:
// - forward (only when the student's gradient is asked for): F on every node, the gradient's prefix
//   part F * prefF; the element's F joins the running sum after its whole tie group;
// - backward: E and F again (recomputed: storing M x C values would cost more memory traffic than
//   the exponentials), the loss sum E * sufF (= the sum over pairs p before q of F_q E_p) and the
//   gradient's suffix part F * sufF.
// Running sums are float64 for float64 inputs; for float32 they are float32 lanes flushed into
// float64 totals every 16 elements (RunningSum), so no rounding error builds up along the row.
// exp is a SIMD polynomial; float inputs build y = exp(t_m + b) as (e^b e^{t_block}, in double) *
// e^{t_m - t_block}: one multiplication per element and node, and exp(-y) is the only exponential.
//
// Compiled once per ISA variant (cpu_variant.h), called by cpu_library.cpp.
//
// Rows are spread over torch's intra-op threads, one row per thread, each with its own buffers
// (O(threads * C) extra memory; nothing of size M x C is stored). A row's bits depend on its values
// alone: not on the batch, the thread count or the run.
//
// A row with a non-finite logit gets NaN; a row with k * (max - min) beyond the lattice's max_spread
// is computed by this variant's pair kernel (kendall_cpu.cpp) on those rows, inside this op.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "cpu_variant.h"
#include "expsum.h"
#include "pair_math.h"
#include "simd.h"

RKKD_NAMESPACE_BEGIN
namespace expsum_cpu {
namespace {

// The lanes of one compute type: V holds W values (one per node), D the double accumulators (two
// per float vector, one per double vector).
template <typename T>
struct Simd {
  static constexpr int W = kVectorBytes / int(sizeof(T));
  static constexpr int DW = kVectorBytes / int(sizeof(double));
  static constexpr int kParts = W / DW;  // double vectors per value vector
  using V = Vec<T, W>;
  using D = Vec<double, DW>;
  using I = Vec<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>, W>;
};

template <typename To, typename From>
inline To bits(From v) {
  return bit_cast<To>(v);
}

// exp(x) on SIMD lanes for x <= kMax, and exactly 0 where x < kMin (the result would be below the
// smallest normal number, and every use of it is then negligible): x = n ln 2 + r, |r| <= ln 2 / 2,
// exp(r) by its Taylor polynomial (degree 7 for float: remainder below 1e-8 relative; degree 13 for
// double: below 5e-18), 2^n put into the exponent bits. ln 2 is split in two so that n ln 2 is exact.
template <typename T>
struct VecExp;

template <>
struct VecExp<float> {
  static constexpr float kMin = -87.0f;
  using S = Simd<float>;
  static inline S::V exp(S::V x) {
    const S::I keep = x >= kMin;
    x = x < kMin ? S::V{} + kMin : x;
    const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const S::V shifted = x * 1.44269504088896341f + magic;
    const S::V n = shifted - magic;
    S::V r = x - n * 0.693145751953125f;  // ln 2 = 0.693145751953125 + 1.42860682e-6
    r = r - n * 1.428606820309417e-06f;
    S::V p = S::V{} + (1.0f / 5040.0f);
    p = p * r + (1.0f / 720.0f);
    p = p * r + (1.0f / 120.0f);
    p = p * r + (1.0f / 24.0f);
    p = p * r + (1.0f / 6.0f);
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const S::I n_int = bits<S::I>(shifted) - bits<int32_t>(magic);
    const S::V scale = bits<S::V>((n_int + 127) << 23);
    return bits<S::V>(bits<S::I>(p * scale) & keep);
  }
};

template <>
struct VecExp<double> {
  static constexpr double kMin = -708.0;
  using S = Simd<double>;
  static inline S::V exp(S::V x) {
    const S::I keep = x >= kMin;
    x = x < kMin ? S::V{} + kMin : x;
    const double magic = 6755399441055744.0;  // 1.5 * 2^52
    const S::V shifted = x * 1.4426950408889634074 + magic;
    const S::V n = shifted - magic;
    S::V r = x - n * 0.693147180369123816490;  // ln 2 = hi + lo, hi with 32 significant bits
    r = r - n * 1.90821492927058770002e-10;
    constexpr double kInvFact[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                   1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                   1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                   1.0 / 24.0,         1.0 / 6.0,         0.5,
                                   1.0,                1.0};
    S::V p = S::V{} + kInvFact[0];
    for (int i = 1; i < 14; ++i) p = p * r + kInvFact[i];
    const S::I n_int = bits<S::I>(shifted) - bits<int64_t>(magic);
    const S::V scale = bits<S::V>((n_int + 1023) << 52);
    return bits<S::V>(bits<S::I>(p * scale) & keep);
  }
};

// ------------------------------------------------------------------------------------------------
// The sort: LSD radix sort of the teacher's order keys, 11 bits a pass (3 passes for float keys);
// stable, so equal keys keep their index order (passes whose digit is the same for every key are
// skipped).
// ------------------------------------------------------------------------------------------------

// An unsigned key whose ascending order is the descending order of the value; -0 and +0 are one
// key (they are equal: sign(t_p - t_q) = 0).
inline uint32_t descending_key(float v) {
  const uint32_t u = bits<uint32_t>(v + 0.0f);
  return ~((u & 0x80000000u) ? ~u : (u | 0x80000000u));
}
inline uint64_t descending_key(double v) {
  const uint64_t u = bits<uint64_t>(v + 0.0);
  return ~((u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull));
}

template <typename K>
void radix_sort(Buffer<K>& keys, Buffer<int32_t>& index, Buffer<K>& keys_tmp,
                Buffer<int32_t>& index_tmp, int64_t c) {
  keys_tmp.resize(c);
  index_tmp.resize(c);
  for (int64_t i = 0; i < c; ++i) index[i] = int32_t(i);
  constexpr int kBits = 11;
  constexpr K kMask = (K(1) << kBits) - 1;
  std::array<int64_t, size_t(1) << kBits> count;
  for (int shift = 0; shift < int(8 * sizeof(K)); shift += kBits) {
    count.fill(0);
    for (int64_t i = 0; i < c; ++i) ++count[(keys[i] >> shift) & kMask];
    if (count[(keys[0] >> shift) & kMask] == c) continue;  // one digit for every key
    int64_t offset = 0;
    for (auto& n : count) {
      const int64_t here = n;
      n = offset;
      offset += here;
    }
    for (int64_t i = 0; i < c; ++i) {
      const int64_t to = count[(keys[i] >> shift) & kMask]++;
      keys_tmp[to] = keys[i];
      index_tmp[to] = index[i];
    }
    keys.swap(keys_tmp);
    index.swap(index_tmp);
  }
}

// ------------------------------------------------------------------------------------------------
// One row.
// ------------------------------------------------------------------------------------------------

enum class RowKind : uint8_t { kExpsum, kNonFinite, kPairs };

// Elements between two flushes of the running sums' T-valued parts into their double totals.
constexpr int64_t kFlushEvery = 16;

// A sum over the sorted elements, one per node lane. The truth is `total` (double). The inner loop
// reads `base` (total rounded to T once, at the last flush) + `recent` (the T sum of the groups
// completed since) and adds into `recent`, or into `pending` while a tie group is open. Every
// kFlushEvery elements the T parts join the double totals: a T sum never holds more than
// kFlushEvery terms, and no rounding error accumulates along the row.
template <typename T>
struct RunningSum {
  Buffer<double> total, pending_total;
  Buffer<T> base, recent, pending;

  void reset(int64_t lanes) {
    total.assign(lanes, 0.0);
    pending_total.assign(lanes, 0.0);
    base.assign(lanes, T(0));
    recent.assign(lanes, T(0));
    pending.assign(lanes, T(0));
  }
  void flush() {
    for (size_t l = 0; l < total.size(); ++l) {
      total[l] += double(recent[l]);
      recent[l] = T(0);
      base[l] = T(total[l]);
      pending_total[l] += double(pending[l]);
      pending[l] = T(0);
    }
  }
  // The open tie group closes: its sum joins the total (the prefix of the groups after it).
  void close_group() {
    for (size_t l = 0; l < total.size(); ++l) {
      total[l] += double(recent[l]);
      total[l] += pending_total[l] + double(pending[l]);
      recent[l] = T(0);
      pending[l] = T(0);
      pending_total[l] = 0.0;
      base[l] = T(total[l]);
    }
  }
  double sum() {
    flush();
    double out = 0;
    for (const double v : total) out += v;
    return out;
  }
};

// A thread's buffers, reused across its rows.
template <typename T>
struct RowBuffers {
  using Key = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  Buffer<Key> keys, keys_tmp;
  Buffer<int32_t> order, order_tmp;
  Buffer<int32_t> group_end;  // one past the last element of each tie group, in sorted order
  Buffer<double> b;                // 2k (s - centre), sorted (double inputs: the y argument)
  Buffer<double> a;                // exp(b), sorted (float inputs: y = a e^{t_block} * e^{t_m - t_block})
  Buffer<double> prefix_part;  // sum_m F prefF of each element, sorted
  Buffer<double> grad;              // suffix part - prefix part, sorted
  // The lattice, per vector block of nodes and per lane (padded to whole vectors).
  Buffer<double> block_scale;  // float: e^{t_block}, t_block the block's first node
  Buffer<T> lane_scale;             // float: e^{t_m - t_block} (0 on padded lanes: y = 0, F = 0)
  Buffer<T> node_t;                 // double: t_m (a large negative number on padded lanes)
  double block_span = 0;            // float: e^{(W - 1) h}, the largest lane_scale; double: (W - 1) h
  RunningSum<T> sum_f, sum_loss;
};

template <typename T>
struct Lattice {
  double step, lead, tail, max_spread;
  Lattice()
      : step(ExpsumLattice<T>::step),
        lead(expsum_lead(ExpsumLattice<T>::step, ExpsumLattice<T>::cut)),
        tail(expsum_tail(ExpsumLattice<T>::step, ExpsumLattice<T>::cut)),
        max_spread(ExpsumLattice<T>::max_spread) {}
};

// exp(-y) by its Taylor polynomial of degree 4, for blocks where every y is small (float: y < 1/32,
// remainder below 3e-10; double: y < 1/1024, below 1e-17): four FMAs instead of VecExp.
template <typename T, typename V>
inline V exp_neg_small(V y) {
  const V u = -y;
  V p = V{} + T(1.0 / 24.0);
  p = p * u + T(1.0 / 6.0);
  p = p * u + T(0.5);
  p = p * u + T(1);
  return p * u + T(1);
}

// y, E = exp(-y) and F = y E on the W nodes of vector block `blk` for the element with b (and
// a = e^b); false when every E of this block and of all later blocks is 0 (y only grows with m),
// which is what computing them would add.
template <typename T>
struct NodeTerms;

template <>
struct NodeTerms<float> {
  using S = Simd<float>;
  const double* block_scale;
  const float* lane_scale;
  double block_span;
  explicit NodeTerms(const RowBuffers<float>& buf)
      : block_scale(buf.block_scale.data()), lane_scale(buf.lane_scale.data()), block_span(buf.block_span) {}
  inline bool at(int64_t blk, double /*b*/, double a, S::V& e, S::V& f) const {
    // The block's smallest y: from 88 on every exp(-y) is 0 (VecExp's cut), and so are all later.
    const double z = a * block_scale[blk];
    if (z >= 88.0) return false;
    const S::V y = float(z) * load<S::V>(lane_scale + blk * S::W);
    e = z * block_span < 1.0 / 32.0 ? exp_neg_small<float>(y) : VecExp<float>::exp(-y);
    f = y * e;
    return true;
  }
};

template <>
struct NodeTerms<double> {
  using S = Simd<double>;
  const double* node_t;
  double block_span;
  explicit NodeTerms(const RowBuffers<double>& buf) : node_t(buf.node_t.data()), block_span(buf.block_span) {}
  inline bool at(int64_t blk, double b, double /*a*/, S::V& e, S::V& f) const {
    const S::V arg = load<S::V>(node_t + blk * S::W) + b;
    if (arg[0] >= 6.57) return false;  // y >= e^6.57 > 708 on every node from here: E = 0
    // y <= e^700 stays finite (E is then 0 and F = y * 0 = 0); below e^-708 it is 0 (E = 1, F = 0).
    const S::V y = VecExp<double>::exp(arg > 700.0 ? S::V{} + 700.0 : arg);
    // The block's largest y below e^-6.94 < 1/1024 (padded lanes lie further below):
    e = arg[0] + block_span < -6.94 ? exp_neg_small<double>(y) : VecExp<double>::exp(-y);
    f = y * e;
    return true;
  }
};

// The node lattice of a row with M nodes from m_lo, into the buffers; returns the vector blocks.
template <typename T>
int64_t set_nodes(RowBuffers<T>& buf, const NodeRange& nodes, double step) {
  constexpr int64_t W = Simd<T>::W;
  const int64_t blocks = (nodes.count + W - 1) / W;
  const int64_t lanes = blocks * W;
  buf.block_scale.resize(blocks);
  buf.lane_scale.assign(lanes, T(0));
  buf.node_t.assign(lanes, T(-1.0e4));
  buf.block_span = std::is_same<T, float>::value ? std::exp(double(W - 1) * step) : double(W - 1) * step;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const double t_block = double(nodes.first + blk * W) * step;
    buf.block_scale[blk] = std::exp(t_block);
    for (int64_t l = 0; l < W && blk * W + l < nodes.count; ++l) {
      buf.lane_scale[blk * W + l] = T(std::exp(double(l) * step));
      buf.node_t[blk * W + l] = T(double(nodes.first + blk * W + l) * step);
    }
  }
  return blocks;
}

// One scan along the teacher's order with the running sum of F over the groups already passed:
// - forward (kBackward false): prefix_part[x] = sum_m F_m,x prefF_m(x);
// - backward: the loss sum, sum_m sum_x E_m,x sufF_m(x) (= sum over pairs p before q of F_q E_p),
//   and with kGrad, grad[x] = sum_m F_m,x sufF_m(x) - prefix_part[x].
// A group of one element (no tie) joins the running sum at once; a larger group's sum waits in
// `pending` until its last element is done, so every member sees only the groups strictly before
// (or after) it.
template <typename T, bool kBackward, bool kGrad>
double scan(RowBuffers<T>& buf, int64_t blocks) {
  using S = Simd<T>;
  using V = typename S::V;
  RunningSum<T>& sum_f = buf.sum_f;
  RunningSum<T>& loss = buf.sum_loss;
  sum_f.reset(blocks * S::W);
  if (kBackward) loss.reset(blocks * S::W);
  // Plain pointers, read once: the stores below go through T*, which the compiler must otherwise
  // assume could change the vectors' own data pointers.
  T* const recent = sum_f.recent.data();
  T* const pending = sum_f.pending.data();
  const T* const base = sum_f.base.data();
  T* const loss_recent = loss.recent.data();
  const double* const b = buf.b.data();
  const double* const a = buf.a.data();
  double* const prefix_part = buf.prefix_part.data();
  double* const grad = buf.grad.data();
  const NodeTerms<T> terms(buf);
  int64_t since_flush = 0;
  auto element = [&](int64_t x, auto single_tag) {
    constexpr bool kSingle = decltype(single_tag)::value;
    T* const to_f = kSingle ? recent : pending;
    V dot{};
    for (int64_t blk = 0; blk < blocks; ++blk) {
      V e, f;
      if (!terms.at(blk, b[x], a[x], e, f)) break;
      const int64_t o = blk * S::W;
      const V recent_f = load<V>(recent + o);
      const V passed = load<V>(base + o) + recent_f;
      if (kBackward) store(loss_recent + o, load<V>(loss_recent + o) + e * passed);
      if (kGrad) dot += f * passed;
      store(to_f + o, (kSingle ? recent_f : load<V>(to_f + o)) + f);
    }
    if (kGrad) {
      if (kBackward) {
        grad[x] = lane_sum(dot) - prefix_part[x];
      } else {
        prefix_part[x] = lane_sum(dot);
      }
    }
    if (++since_flush == kFlushEvery) {
      sum_f.flush();
      if (kBackward) loss.flush();
      since_flush = 0;
    }
  };
  const int64_t groups = int64_t(buf.group_end.size());
  const int32_t* const group_end = buf.group_end.data();
  for (int64_t i = 0; i < groups; ++i) {
    const int64_t g = kBackward ? groups - 1 - i : i;
    const int64_t begin = g == 0 ? 0 : group_end[g - 1], end = group_end[g];
    if (end - begin == 1) {
      element(begin, std::true_type{});
      continue;
    }
    for (int64_t j = 0; j < end - begin; ++j) element(kBackward ? end - 1 - j : begin + j, std::false_type{});
    sum_f.close_group();
  }
  return kBackward ? loss.sum() : 0.0;
}

template <typename scalar_t>
bool all_finite(const scalar_t* x, int64_t c) {
  bool finite = true;
  for (int64_t i = 0; i < c; ++i) finite = finite && std::isfinite(static_cast<double>(x[i]));
  return finite;
}

// One row: its kind, and for an exp-sum row the loss and (when grad_s) the student's gradient.
template <typename scalar_t, typename T>
RowKind expsum_row(const scalar_t* s, const scalar_t* t, int64_t c, double k,
                   const Lattice<T>& lattice, RowBuffers<T>& buf, T* loss, T* grad_s) {
  const RowRange rs = row_range(s, c);
  if (!rs.finite || !all_finite(t, c)) return RowKind::kNonFinite;
  const double spread = k * rs.spread();
  if (!(spread <= lattice.max_spread)) return RowKind::kPairs;

  // The teacher's order (descending, stable) and its tie groups.
  buf.keys.resize(c);
  buf.order.resize(c);
  for (int64_t i = 0; i < c; ++i) buf.keys[i] = descending_key(T(t[i]));
  radix_sort(buf.keys, buf.order, buf.keys_tmp, buf.order_tmp, c);
  buf.group_end.clear();
  int64_t tied = 0, begin = 0;
  for (int64_t x = 1; x <= c; ++x) {
    if (x == c || buf.keys[x] != buf.keys[x - 1]) {
      const int64_t n = x - begin;
      tied += n * (n - 1) / 2;
      buf.group_end.push_back(int32_t(x));
      begin = x;
    }
  }

  const double centre = rs.centre();
  const double two_k = 2.0 * k;
  using D = typename Simd<T>::D;
  constexpr int64_t DW = Simd<T>::DW;
  const int64_t padded = (c + DW - 1) / DW * DW;
  buf.b.assign(padded, 0.0);
  buf.a.resize(padded);
  for (int64_t x = 0; x < c; ++x) buf.b[x] = two_k * (static_cast<double>(s[buf.order[x]]) - centre);
  if constexpr (std::is_same<T, float>::value) {  // |b| <= k R <= 80: no overflow
    for (int64_t x = 0; x < padded; x += DW) store(buf.a.data() + x, VecExp<double>::exp(load<D>(buf.b.data() + x)));
  }
  const int64_t blocks =
      set_nodes(buf, expsum_nodes(spread, lattice.step, lattice.lead, lattice.tail), lattice.step);

  const ExpsumScale scale(c, k, lattice.step);
  double f_pref_e;
  if (grad_s) {
    buf.prefix_part.resize(c);
    buf.grad.resize(c);
    scan<T, false, true>(buf, blocks);
    f_pref_e = scan<T, true, true>(buf, blocks);
    for (int64_t x = 0; x < c; ++x) grad_s[buf.order[x]] = T(scale.grad_scale * buf.grad[x]);
  } else {
    f_pref_e = scan<T, true, false>(buf, blocks);
  }
  *loss = T(scale.loss(tied, f_pref_e));
  return RowKind::kExpsum;
}

// The rows that the pair kernel computes (k * R beyond the lattice's limit): this variant's pair
// kernel on a copy of those rows, its results put back in place. A row's result does not depend on
// the other rows of its call, so these are the bits the pair kernel gives the row anywhere.
template <typename scalar_t, typename T>
void pair_kernel_rows(InputType type, const scalar_t* s, const scalar_t* t, int64_t c, double k,
                      const Buffer<int64_t>& rows, T* loss, T* grad_s) {
  const int64_t n = int64_t(rows.size());
  if (n == 0) return;
  Buffer<scalar_t> s_rows(n * c), t_rows(n * c);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(static_cast<void*>(s_rows.data() + i * c), s + rows[i] * c, sizeof(scalar_t) * c);
    std::memcpy(static_cast<void*>(t_rows.data() + i * c), t + rows[i] * c, sizeof(scalar_t) * c);
  }
  Buffer<T> loss_rows(n), grad_rows(grad_s ? n * c : 0);
  const KendallArgs args{type, s_rows.data(), t_rows.data(), n, c, k, /*hard_teacher=*/true,
                         loss_rows.data(), grad_s ? grad_rows.data() : nullptr, nullptr};
  kendall_pairs(args);
  for (int64_t i = 0; i < n; ++i) {
    loss[rows[i]] = loss_rows[i];
    if (grad_s) std::memcpy(grad_s + rows[i] * c, grad_rows.data() + i * c, sizeof(T) * c);
  }
}

template <typename scalar_t, typename T>
void expsum_rows(InputType type, const scalar_t* s, const scalar_t* t, int64_t rows, int64_t c,
                 double k, T* loss, T* grad_s) {
  const Lattice<T> lattice;
  Buffer<RowKind> kinds(rows);
  parallel_rows(0, rows, 1, [&](int64_t begin, int64_t end) {
    RowBuffers<T> buf;
    for (int64_t r = begin; r < end; ++r) {
      T* g = grad_s ? grad_s + r * c : nullptr;
      kinds[r] = expsum_row<scalar_t, T>(s + r * c, t + r * c, c, k, lattice, buf, loss + r, g);
      if (kinds[r] == RowKind::kNonFinite) {  // a non-finite logit makes its row NaN, never 0
        const T nan = std::numeric_limits<T>::quiet_NaN();
        loss[r] = nan;
        if (g) std::fill(g, g + c, nan);
      }
    }
  });
  Buffer<int64_t> pair_rows;
  for (int64_t r = 0; r < rows; ++r) {
    if (kinds[r] == RowKind::kPairs) pair_rows.push_back(r);
  }
  pair_kernel_rows(type, s, t, c, k, pair_rows, loss, grad_s);
}

}  // namespace
}  // namespace expsum_cpu

void kendall_expsum(const KendallArgs& a) {
  dispatch_input_type(a.type, [&](auto scalar, auto acc) {
    using scalar_t = decltype(scalar);
    using acc_t = decltype(acc);
    expsum_cpu::expsum_rows<scalar_t, acc_t>(
        a.type, static_cast<const scalar_t*>(a.student), static_cast<const scalar_t*>(a.teacher), a.rows,
        a.c, a.k, static_cast<acc_t*>(a.loss), static_cast<acc_t*>(a.grad_student));
  });
}

RKKD_NAMESPACE_END
