// The CUDA kernel of rkkd::kendall: loss and both gradients in one pass over each row's pairs, with
// the pair math of pair_math.h (the same paths and thresholds as kendall_cpu.cpp).
//
// Launches, all on the current stream, none waiting on the host:
//   1. plan_rows: per row, the range of student and teacher -> which path (pair_math.h's
//      choose_row_path: small-spread or ratio form in float or double, direct tanh in double, or a
//      NaN row) and the row centres of the weights.
//   2. pair_sums, once per path: rows of other paths return at once. The row's channels are cut
//      into tiles of kTile, its unordered pairs into tile pairs (I, J) with I <= J, and each row
//      gets `splits` blocks, which deal the tile pairs out in snake order (0 1 2 2 1 0 0 1 ...;
//      full off-diagonal tile pairs first, the half-size diagonal ones last, so the loads even
//      out). A block adds its partial gradient sums into a scratch slice that it alone owns
//      (splits x C per row and gradient). No address is written by two blocks, so there are no
//      atomics, and every sum is taken in one fixed order: results are bitwise reproducible.
//   3. finish_rows: adds the slices of each channel in slice order, scales, writes loss and
//      gradients in the accumulation dtype. NaN rows are written here without reading their
//      scratch, which no pair_sums launch writes (it would be uninitialised memory).
// Extra memory: the plan (rows) and the scratch, rows x splits x C per gradient with splits at
// most kMaxSplits: O(rows x C), never rows x C x C.
//
// Inside a tile pair. Each lane owns kLaneRows channels of tile I: their values and gradient sums
// stay in registers. A warp meets tile J 32 channels (a chunk) at a time: the chunk's values and
// gradient sums travel round the warp by shuffles, one lane per step, so after 32 steps every lane
// has paired its channels with every channel of the chunk and the chunk's sums are back home. The
// j side of each pair is thus accumulated without a reduction or a shared-memory read-modify-write.
// Warps leave their chunk sums in shared memory and the block adds them in warp order.
// Diagonal tile pairs (I == J) visit each unordered pair once: a chunk meets each later chunk by a
// full rotation and itself by a half rotation (offsets 1..16; offset 16 taken by lanes 0..15 only).
#include <cuda_runtime.h>
#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>

#include "kendall_op.h"
#include "pair_math.h"

namespace rkkd {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarp = 0xffffffffu;
constexpr int kWarps = 2;                             // warps per block of pair_sums
constexpr int kThreads = kWarps * kWarpSize;          // 64
// Tile-I channels each lane owns: the three shuffles that pass a traveller on serve kLaneRows
// pairs (4: 0.75 shuffles per pair, 2: 1.5 in the sm_90 SASS of the loop).
constexpr int kLaneRows = 4;
constexpr int kChunks = kWarps * kLaneRows;           // 32-channel chunks per tile
constexpr int kTile = kChunks * kWarpSize;            // 256 channels
constexpr int kMaxSplits = 64;                        // blocks per row, at most
constexpr int64_t kScratchSoftLimit = int64_t(64) << 20;  // bytes; see choose_splits
// Blocks of pair_sums per SM that the registers must allow: 64 registers per thread for float,
// 128 for double (65536 per SM).
constexpr int kFloatBlocksPerSM = 16;
constexpr int kDoubleBlocksPerSM = 8;
constexpr int kPlanThreads = 256;
constexpr int kFinishThreads = 256;

// How a row is computed; chosen on the device by plan_rows with the CPU kernel's rule.
struct RowPlan {
  double centre_s;  // (max + min) / 2 of the student row
  double centre_t;  // of the teacher row
  RowPath path;     // int32_t
  int32_t unused;
};

// ------------------------------------------------------------------------------------------------
// The paths: what each element is turned into once per tile load, and the tanh of a pair.

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float expm1_of(float x) { return expm1f(x); }
__device__ __forceinline__ double expm1_of(double x) { return expm1(x); }

// Ratio form (kSmall false): a = exp(2k (x - centre)); small-spread form (kSmall): e = expm1 of the
// same. The argument is rounded to T first as on the CPU; for a hard teacher the teacher keeps its
// logits (only the sign of differences is used).
template <typename T, bool kSmall = false>
struct RatioPath {
  using value_t = T;
  static constexpr bool kFloat = std::is_same<T, float>::value;
  static constexpr RowPath kPath = kSmall ? (kFloat ? RowPath::kFloatSmall : RowPath::kDoubleSmall)
                                          : (kFloat ? RowPath::kFloatRatio : RowPath::kDoubleRatio);
  static constexpr int kMinBlocksPerSM = kFloat ? kFloatBlocksPerSM : kDoubleBlocksPerSM;
  static __device__ __forceinline__ T value(double x, double two_k, double centre, bool keep_logit) {
    if (keep_logit) return T(x);
    const T arg = T(two_k * (x - centre));
    return kSmall ? expm1_of(arg) : exp_of(arg);
  }
  // Padding past C: the weight of a zero argument, finite (pairs with it are masked out).
  static __device__ __forceinline__ T padding() { return kSmall ? T(0) : T(1); }
  static __device__ __forceinline__ TanhPair<T> tanh_of(T x_i, T x_j, double /*k*/) {
    return kSmall ? tanh_from_expm1(x_i, x_j) : tanh_from_ratio(x_i, x_j);
  }
};
template <typename T>
using SmallSpreadPath = RatioPath<T, true>;

// The guarded path for rows whose spread overflows the ratio form: tanh of each pair, in double.
struct DirectPath {
  using value_t = double;
  static constexpr RowPath kPath = RowPath::kDirect;
  static constexpr int kMinBlocksPerSM = kDoubleBlocksPerSM;
  static __device__ __forceinline__ double value(double x, double, double, bool) { return x; }
  static __device__ __forceinline__ double padding() { return 0.0; }
  static __device__ __forceinline__ TanhPair<double> tanh_of(double x_i, double x_j, double k) {
    return tanh_direct(k * (x_i - x_j));
  }
};

template <typename scalar_t>
__device__ __forceinline__ double load_double(const scalar_t* p, int64_t i) {
  return static_cast<double>(static_cast<float>(p[i]));
}
template <>
__device__ __forceinline__ double load_double<double>(const double* p, int64_t i) {
  return p[i];
}

// ------------------------------------------------------------------------------------------------
// 1. plan_rows: one block per row.

template <typename T>
__device__ __forceinline__ T warp_min(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = fmin(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    v = fmax(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPlanThreads)
    plan_rows(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
              int64_t c, double k, bool hard, RowPlan* __restrict__ plans) {
  constexpr int kBlockWarps = kPlanThreads / kWarpSize;
  __shared__ acc_t partial[4][kBlockWarps];
  const int64_t row = blockIdx.x;
  const scalar_t* s = student + row * c;
  const scalar_t* t = teacher + row * c;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  acc_t lo_s = inf, hi_s = -inf, lo_t = inf, hi_t = -inf;
  bool finite = true;
  for (int64_t i = threadIdx.x; i < c; i += kPlanThreads) {
    const acc_t vs = static_cast<acc_t>(load_double(s, i));
    const acc_t vt = static_cast<acc_t>(load_double(t, i));
    finite = finite && isfinite(vs) && isfinite(vt);
    lo_s = fmin(lo_s, vs);
    hi_s = fmax(hi_s, vs);
    lo_t = fmin(lo_t, vt);
    hi_t = fmax(hi_t, vt);
  }
  finite = __syncthreads_and(finite);  // also orders the shared writes below after earlier reads
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  lo_s = warp_min(lo_s);
  hi_s = warp_max(hi_s);
  lo_t = warp_min(lo_t);
  hi_t = warp_max(hi_t);
  if (lane == 0) {
    partial[0][warp] = lo_s;
    partial[1][warp] = hi_s;
    partial[2][warp] = lo_t;
    partial[3][warp] = hi_t;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kBlockWarps; ++w) {  // min and max are exact: any order gives one answer
    lo_s = fmin(lo_s, partial[0][w]);
    hi_s = fmax(hi_s, partial[1][w]);
    lo_t = fmin(lo_t, partial[2][w]);
    hi_t = fmax(hi_t, partial[3][w]);
  }
  const RowPath path = choose_row_path(finite, k, double(hi_s) - double(lo_s),
                                       double(hi_t) - double(lo_t), hard,
                                       !std::is_same<acc_t, double>::value);
  plans[row] = RowPlan{row_centre(lo_s, hi_s), row_centre(lo_t, hi_t), path, 0};
}

// ------------------------------------------------------------------------------------------------
// 2. pair_sums.

// The chunk of a tile whose channels lane rows q of warp w own. Snake order (w, then back for odd
// q) gives every warp an equal share of a diagonal tile's triangle: for each pair of lane rows
// (2p, 2p + 1) warp w owns chunks 2p kWarps + w and (2p + 2) kWarps - 1 - w, which meet the same
// number of later chunks in all for every w.
__device__ __forceinline__ int owned_chunk(int warp, int q) {
  return q * kWarps + ((q & 1) ? kWarps - 1 - warp : warp);
}

template <typename T>
struct Traveller {  // a tile-J channel on its way round the warp
  T a, b;           // student and teacher values
  T gs, gt;         // its gradient sums over the pairs met so far
};

// One lane's tile-I channels and its running sums.
template <typename Path, bool kHard, bool kGradT>
struct LaneRows {
  using T = typename Path::value_t;
  T a[kLaneRows], b[kLaneRows];
  T gs[kLaneRows], gt[kLaneRows];
  T tau;
  double k;

  // Pair (own channel q, traveller j): i adds, j subtracts (the terms are antisymmetric, so this
  // holds whichever of the two has the lower index). Masked pairs get a zero teacher weight.
  template <bool kMasked>
  __device__ __forceinline__ void visit(int q, Traveller<T>& j, bool valid) {
    const TanhPair<T> s = Path::tanh_of(a[q], j.a, k);
    PairTerms<T> p;
    if constexpr (kHard) {
      T w = Arith<T>::sign(b[q] - j.b);
      if (kMasked && !valid) w = T(0);
      p = hard_teacher_pair(s, w);
    } else {
      TanhPair<T> t = Path::tanh_of(b[q], j.b, k);
      if (kMasked && !valid) t = TanhPair<T>{T(0), T(0)};
      p = soft_teacher_pair(s, t);
    }
    tau += p.tau;
    gs[q] += p.grad_s;
    j.gs -= p.grad_s;
    if constexpr (kGradT) {
      gt[q] += p.grad_t;
      j.gt -= p.grad_t;
    }
  }
};

template <bool kGradT, typename T>
__device__ __forceinline__ void pass_on(Traveller<T>& j, int from_lane) {
  j.a = __shfl_sync(kFullWarp, j.a, from_lane);
  j.b = __shfl_sync(kFullWarp, j.b, from_lane);
  j.gs = __shfl_sync(kFullWarp, j.gs, from_lane);
  if constexpr (kGradT) j.gt = __shfl_sync(kFullWarp, j.gt, from_lane);
}

// 32 steps: every lane pairs its rows in `rows` (a bit set; all when kAllRows) with every channel of
// the chunk. At step r lane l holds the traveller from home lane (l + r) % 32; `chunk_valid` counts
// the chunk's channels below C.
template <bool kMasked, bool kAllRows, typename Path, bool kHard, bool kGradT, typename T>
__device__ __forceinline__ void full_rotation(LaneRows<Path, kHard, kGradT>& me, Traveller<T>& j,
                                              unsigned rows, int lane, int chunk_valid) {
  const int next = (lane + 1) % kWarpSize;
#pragma unroll 4
  for (int r = 0; r < kWarpSize; ++r) {
    const bool valid = !kMasked || ((lane + r) % kWarpSize) < chunk_valid;
#pragma unroll
    for (int q = 0; q < kLaneRows; ++q)
      if (kAllRows || (rows >> q & 1u)) me.template visit<kMasked>(q, j, valid);
    pass_on<kGradT>(j, next);
  }
}

// The pairs inside one chunk (own rows q against the same chunk), each once: offsets 1..15 from
// every lane, offset 16 from lanes 0..15 only; then the travellers go back home.
template <typename Path, bool kHard, bool kGradT, typename T>
__device__ __forceinline__ void half_rotation(LaneRows<Path, kHard, kGradT>& me, Traveller<T>& j,
                                              int q, int lane, int chunk_valid) {
  const int next = (lane + 1) % kWarpSize;
  const bool lane_valid = lane < chunk_valid;
  constexpr int kHalf = kWarpSize / 2;
#pragma unroll 4
  for (int d = 1; d <= kHalf; ++d) {
    pass_on<kGradT>(j, next);
    const bool valid = lane_valid && ((lane + d) % kWarpSize) < chunk_valid && (d < kHalf || lane < kHalf);
    me.template visit<true>(q, j, valid);
  }
  pass_on<kGradT>(j, (lane + kHalf) % kWarpSize);
}

// One piece: split into forceinline helpers, nvcc allocates it differently (same count, other SASS).
template <typename scalar_t, typename acc_t, typename Path, bool kHard, bool kGradT>
__global__ void __launch_bounds__(kThreads, Path::kMinBlocksPerSM)
    pair_sums(const scalar_t* __restrict__ student, const scalar_t* __restrict__ teacher,
              const RowPlan* __restrict__ plans, int64_t c, double k, int splits, int sums_per_row,
              acc_t* __restrict__ scratch, acc_t* __restrict__ tau_scratch) {
  using T = typename Path::value_t;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const RowPlan plan = plans[row];
  if (plan.path != Path::kPath) return;  // uniform across the block: no barrier is skipped halfway

  __shared__ T tile_a[kTile], tile_b[kTile];      // tile J: student and teacher values
  __shared__ T chunk_gs[kWarps][kTile];            // each warp's sums for the channels of tile J
  __shared__ T chunk_gt[kWarps][kGradT ? kTile : 1];
  __shared__ T warp_tau[kWarps];

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const scalar_t* s = student + row * c;
  const scalar_t* t = teacher + row * c;
  const double two_k = 2.0 * k;
  // This block's slice: sums_per_row gradient vectors of length C (grad_s, then grad_t if kept).
  acc_t* slice = scratch + (row * splits + split) * sums_per_row * c;
  const bool keep_gt = kGradT && sums_per_row > 1;
  for (int64_t x = threadIdx.x; x < sums_per_row * c; x += kThreads) slice[x] = acc_t(0);
  // (The first tile pair's barriers order these zeros before any thread adds to the slice.)

  LaneRows<Path, kHard, kGradT> me;
  me.k = k;
  me.tau = T(0);

  const int64_t n_tiles = (c + kTile - 1) / kTile;
  const int64_t n_off_diagonal = n_tiles * (n_tiles - 1) / 2;
  const int64_t n_pairs = n_off_diagonal + n_tiles;
  for (int64_t round = 0; round * splits < n_pairs; ++round) {
    const int64_t pair = round * splits + ((round & 1) ? splits - 1 - split : split);  // snake
    if (pair >= n_pairs) continue;  // uniform across the block
    // Off-diagonal pairs first, ordered by J: pair = J (J - 1) / 2 + I; then the diagonal.
    int64_t tile_i, tile_j;
    if (pair < n_off_diagonal) {
      tile_j = int64_t((1.0 + sqrt(1.0 + 8.0 * double(pair))) / 2.0);
      while (tile_j * (tile_j - 1) / 2 > pair) --tile_j;  // guard the rounding of sqrt
      while ((tile_j + 1) * tile_j / 2 <= pair) ++tile_j;
      tile_i = pair - tile_j * (tile_j - 1) / 2;
    } else {
      tile_i = tile_j = pair - n_off_diagonal;
    }
    const bool diagonal = tile_i == tile_j;
    const int64_t i0 = tile_i * kTile, j0 = tile_j * kTile;
    const int j_count = c - j0 < kTile ? int(c - j0) : kTile;  // channels of tile J below C

    for (int q = 0; q < kLaneRows; ++q) {
      const int slot = owned_chunk(warp, q) * kWarpSize + lane;
      const bool inside = slot < j_count;
      tile_a[slot] = inside ? Path::value(load_double(s, j0 + slot), two_k, plan.centre_s, false)
                            : Path::padding();
      tile_b[slot] = inside ? Path::value(load_double(t, j0 + slot), two_k, plan.centre_t, kHard)
                            : Path::padding();
      if (!diagonal) {  // tile I < tile J is a full tile
        me.a[q] = Path::value(load_double(s, i0 + slot), two_k, plan.centre_s, false);
        me.b[q] = Path::value(load_double(t, i0 + slot), two_k, plan.centre_t, kHard);
      }
      me.gs[q] = T(0);
      me.gt[q] = T(0);
    }
    __syncthreads();
    if (diagonal) {
      for (int q = 0; q < kLaneRows; ++q) {
        const int slot = owned_chunk(warp, q) * kWarpSize + lane;
        me.a[q] = tile_a[slot];
        me.b[q] = tile_b[slot];
      }
    }

    const int j_chunks = (j_count + kWarpSize - 1) / kWarpSize;
    for (int v = 0; v < j_chunks; ++v) {
      const int chunk_valid = j_count - v * kWarpSize < kWarpSize ? j_count - v * kWarpSize : kWarpSize;
      const bool masked = chunk_valid < kWarpSize;
      Traveller<T> j{tile_a[v * kWarpSize + lane], tile_b[v * kWarpSize + lane], T(0), T(0)};
      if (!diagonal) {
        if (masked)
          full_rotation<true, true>(me, j, 0u, lane, chunk_valid);
        else
          full_rotation<false, true>(me, j, 0u, lane, chunk_valid);
      } else {
        // Own chunks before v meet chunk v fully; an own chunk equal to v meets itself by half.
        // (An own chunk past the last one below C never matters: it is after every v.)
        unsigned earlier = 0;
        for (int q = 0; q < kLaneRows; ++q) earlier |= unsigned(owned_chunk(warp, q) < v) << q;
        if (earlier != 0) {
          if (masked)
            full_rotation<true, false>(me, j, earlier, lane, chunk_valid);
          else
            full_rotation<false, false>(me, j, earlier, lane, chunk_valid);
        }
        for (int q = 0; q < kLaneRows; ++q)
          if (owned_chunk(warp, q) == v) half_rotation(me, j, q, lane, chunk_valid);
      }
      chunk_gs[warp][v * kWarpSize + lane] = j.gs;
      if constexpr (kGradT) chunk_gt[warp][v * kWarpSize + lane] = j.gt;
    }
    __syncthreads();

    // Add this tile pair's sums to the slice: each channel by the one thread that owns it as an
    // I row, the warps' J sums in warp order.
    for (int q = 0; q < kLaneRows; ++q) {
      const int slot = owned_chunk(warp, q) * kWarpSize + lane;
      if (slot >= j_count && diagonal) continue;  // past C
      T j_gs = T(0), j_gt = T(0);
      if (slot < j_count) {
        for (int w = 0; w < kWarps; ++w) {
          j_gs += chunk_gs[w][slot];
          if constexpr (kGradT) j_gt += chunk_gt[w][slot];
        }
      }
      if (diagonal) {
        slice[i0 + slot] += acc_t(me.gs[q] + j_gs);
        if (keep_gt) slice[c + i0 + slot] += acc_t(me.gt[q] + j_gt);
      } else {
        slice[i0 + slot] += acc_t(me.gs[q]);
        if (keep_gt) slice[c + i0 + slot] += acc_t(me.gt[q]);
        if (slot < j_count) {
          slice[j0 + slot] += acc_t(j_gs);
          if (keep_gt) slice[c + j0 + slot] += acc_t(j_gt);
        }
      }
    }
    // The next tile pair's first barrier comes before anyone rewrites tile_a, tile_b or the chunk
    // sums read above (those are only rewritten after it), and orders the slice updates.
  }

  // The block's tau: lanes, then warps, in a fixed order.
  T tau = me.tau;
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    tau += __shfl_xor_sync(kFullWarp, tau, offset);
  if (lane == 0) warp_tau[warp] = tau;
  __syncthreads();
  if (threadIdx.x == 0) {
    T total = T(0);
    for (int w = 0; w < kWarps; ++w) total += warp_tau[w];
    tau_scratch[row * splits + split] = acc_t(total);
  }
}

// ------------------------------------------------------------------------------------------------
// 3. finish_rows: grid-stride over rows x C for the gradients, over rows for the loss.

template <typename acc_t>
__global__ void __launch_bounds__(kFinishThreads)
    finish_rows(const RowPlan* __restrict__ plans, const acc_t* __restrict__ scratch,
                const acc_t* __restrict__ tau_scratch, int64_t rows, int64_t c, double k,
                bool hard, int splits, int sums_per_row, acc_t* __restrict__ loss,
                acc_t* __restrict__ grad_s, acc_t* __restrict__ grad_t) {
  const RowScale<double> scale(c, k);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t r = first; r < rows; r += stride) {
    if (plans[r].path == RowPath::kNonFinite) {
      loss[r] = nan;
      continue;
    }
    double tau = 0.0;
    for (int b = 0; b < splits; ++b) tau += double(tau_scratch[r * splits + b]);
    loss[r] = acc_t(scale.loss(tau));
  }
  if (grad_s == nullptr && grad_t == nullptr) return;
  for (int64_t x = first; x < rows * c; x += stride) {
    const int64_t r = x / c, channel = x % c;
    if (plans[r].path == RowPath::kNonFinite) {  // its scratch was never written: not read
      if (grad_s != nullptr) grad_s[x] = nan;
      if (grad_t != nullptr) grad_t[x] = hard ? acc_t(0) : nan;  // a hard teacher's stays zero
      continue;
    }
    const acc_t* sums = scratch + r * splits * sums_per_row * c + channel;
    if (grad_s != nullptr) {
      acc_t total = acc_t(0);
      for (int b = 0; b < splits; ++b) total += sums[b * sums_per_row * c];
      grad_s[x] = acc_t(scale.grad_scale * double(total));
    }
    if (grad_t != nullptr) {
      if (hard) {  // the hard teacher's gradient is identically zero
        grad_t[x] = acc_t(0);
      } else {
        acc_t total = acc_t(0);
        for (int b = 0; b < splits; ++b) total += sums[b * sums_per_row * c + c];
        grad_t[x] = acc_t(scale.grad_scale * double(total));
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side.

// A CUDA error as a Python RuntimeError that names the cause and, for the two a user can fix, the
// fix (the wheel's kernel needs a driver of its CUDA release, and one of its architectures or PTX).
void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::string fix;
  if (err == cudaErrorInsufficientDriver || err == cudaErrorUnsupportedPtxVersion)
    fix = " (the CUDA driver is older than the CUDA this kernel was built with: update the driver, "
          "or use backend='triton')";
  else if (err == cudaErrorNoKernelImageForDevice)
    fix = " (this GPU's architecture is not in the kernel's TORCH_CUDA_ARCH_LIST: rebuild "
          "rkkd-kernels for it, or use backend='triton')";
  STD_TORCH_CHECK(false, "rkkd::kendall (CUDA): ", what, " failed: ", cudaGetErrorString(err), fix);
}

void check_launch() { check_cuda(cudaGetLastError(), "a kernel launch"); }

int multiprocessor_count() {
  int device = 0, count = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  return count;
}

// Blocks per row. Up to the number of blocks the GPU holds at once (kFloatBlocksPerSM or
// kDoubleBlocksPerSM per SM), as many as fit in one wave: all run side by side and end together,
// rather than a short second wave trailing behind. No more than the row has tile pairs or
// kMaxSplits, and a scratch of at most kScratchSoftLimit bytes unless even 4 splits exceed it
// (then 4: a long row still spreads over a few SMs).
int choose_splits(int64_t rows, int64_t c, int sums_per_row, size_t acc_bytes, int sms) {
  const int64_t n_tiles = (c + kTile - 1) / kTile;
  const int64_t tile_pairs = n_tiles * (n_tiles + 1) / 2;
  const int64_t resident_blocks =
      int64_t(sms) * (acc_bytes == sizeof(double) ? kDoubleBlocksPerSM : kFloatBlocksPerSM);
  int64_t splits = resident_blocks / rows;
  const int64_t bytes_per_split = rows * c * sums_per_row * int64_t(acc_bytes);
  splits = std::min(splits, std::max<int64_t>(4, kScratchSoftLimit / bytes_per_split));
  splits = std::min({splits, tile_pairs, int64_t(kMaxSplits)});
  return int(std::max<int64_t>(splits, 1));
}

struct Launch {
  dim3 grid;
  cudaStream_t stream;
  const RowPlan* plans;
  int64_t c;
  double k;
  int splits;
  int sums_per_row;
  void* scratch;
  void* tau_scratch;
};

template <typename scalar_t, typename acc_t, typename Path, bool kHard, bool kGradT>
void launch_pair_sums(const Launch& l, const scalar_t* s, const scalar_t* t) {
  pair_sums<scalar_t, acc_t, Path, kHard, kGradT><<<l.grid, kThreads, 0, l.stream>>>(
      s, t, l.plans, l.c, l.k, l.splits, l.sums_per_row, static_cast<acc_t*>(l.scratch),
      static_cast<acc_t*>(l.tau_scratch));
  check_launch();
}

// One launch for the rows of one path. Only the main path of a dtype gets a kernel without the
// teacher's sums; the rare guarded paths compute them always and keep them when asked.
template <typename scalar_t, typename acc_t, typename Path, bool kMainPath>
void launch_path(const Launch& l, const scalar_t* s, const scalar_t* t, bool hard, bool keep_gt) {
  if (hard)
    launch_pair_sums<scalar_t, acc_t, Path, true, false>(l, s, t);
  else if (!kMainPath || keep_gt)
    launch_pair_sums<scalar_t, acc_t, Path, false, true>(l, s, t);
  else if constexpr (kMainPath)
    launch_pair_sums<scalar_t, acc_t, Path, false, false>(l, s, t);
}

// The current stream of the tensors' device (torch's, so the launches order with its own work).
// Through the AOTI shim: the stable Stream's native handle needs torch 2.13.
cudaStream_t current_stream(int32_t device_index) {
  void* stream = nullptr;
  STD_TORCH_CHECK(aoti_torch_get_current_cuda_stream(device_index, &stream) == AOTI_TORCH_SUCCESS,
                  "rkkd::kendall (CUDA): cannot get the current CUDA stream");
  return static_cast<cudaStream_t>(stream);
}

// Calls f(scalar_t{}) with the input type (torch's header-only 16-bit types: the same device
// conversions as c10's).
template <typename F>
void dispatch_input_type(ScalarType type, const F& f) {
  switch (type) {
    case ScalarType::Half: return f(torch::headeronly::Half{});
    case ScalarType::BFloat16: return f(torch::headeronly::BFloat16{});
    case ScalarType::Float: return f(float{});
    case ScalarType::Double: return f(double{});
    default:
      STD_TORCH_CHECK(false, "rkkd::kendall takes float16, bfloat16, float32 or float64, got ",
                      torch::headeronly::toString(type));
  }
}

std::tuple<Tensor, Tensor, Tensor> kendall_cuda(Tensor student, Tensor teacher, double k,
                                                bool hard_teacher, bool need_grad_s,
                                                bool need_grad_t) {
  check_kendall_inputs(student, teacher, k);
  STD_TORCH_CHECK(student.is_cuda(), "rkkd::kendall (CUDA) expects CUDA tensors, got ",
                  device_of(student));
  STD_TORCH_CHECK(student.size(0) <= std::numeric_limits<int32_t>::max(),
                  "rkkd::kendall (CUDA) takes at most 2^31 - 1 rows, got ", student.size(0));
  const torch::stable::accelerator::DeviceGuard device_guard(student.get_device_index());
  const Tensor s = torch::stable::contiguous(student);
  const Tensor t = torch::stable::contiguous(teacher);
  const int64_t rows = s.size(0), c = s.size(1);
  const ScalarType acc_type = accumulation_type(s.scalar_type());
  auto [loss, grad_s, grad_t] = allocate_outputs(s, need_grad_s, need_grad_t);
  if (rows == 0) return {loss, grad_s, grad_t};

  // The teacher's sums are kept only when asked for and not identically zero.
  const bool keep_gt = need_grad_t && !hard_teacher;
  const int sums_per_row = keep_gt ? 2 : 1;
  const int sms = multiprocessor_count();
  const int splits = choose_splits(rows, c, sums_per_row, acc_type == ScalarType::Double ? 8 : 4, sms);
  const int64_t plan_shape[] = {rows * int64_t(sizeof(RowPlan))};
  const int64_t scratch_shape[] = {rows, splits, sums_per_row, c};
  const int64_t tau_shape[] = {rows, splits};
  using Shape = torch::headeronly::IntHeaderOnlyArrayRef;
  Tensor plans = torch::stable::new_empty(s, Shape(plan_shape), ScalarType::Byte);
  Tensor scratch = torch::stable::new_empty(s, Shape(scratch_shape), acc_type);
  Tensor tau_scratch = torch::stable::new_empty(s, Shape(tau_shape), acc_type);
  const cudaStream_t stream = current_stream(s.get_device_index());
  auto* plan_ptr = static_cast<RowPlan*>(plans.mutable_data_ptr());

  dispatch_input_type(s.scalar_type(), [&](auto scalar) {
    using scalar_t = decltype(scalar);
    using acc_t = accumulate_t<scalar_t>;
    const scalar_t* s_ptr = static_cast<const scalar_t*>(s.const_data_ptr());
    const scalar_t* t_ptr = static_cast<const scalar_t*>(t.const_data_ptr());
    plan_rows<scalar_t, acc_t><<<dim3(unsigned(rows)), kPlanThreads, 0, stream>>>(
        s_ptr, t_ptr, c, k, hard_teacher, plan_ptr);
    check_launch();

    const Launch launch{dim3(unsigned(rows), unsigned(splits)), stream, plan_ptr, c, k, splits,
                        sums_per_row, scratch.mutable_data_ptr(), tau_scratch.mutable_data_ptr()};
    if constexpr (std::is_same<acc_t, float>::value) {
      launch_path<scalar_t, acc_t, RatioPath<float>, true>(launch, s_ptr, t_ptr, hard_teacher, keep_gt);
      launch_path<scalar_t, acc_t, SmallSpreadPath<float>, false>(launch, s_ptr, t_ptr, hard_teacher, keep_gt);
      launch_path<scalar_t, acc_t, RatioPath<double>, false>(launch, s_ptr, t_ptr, hard_teacher, keep_gt);
    } else {
      launch_path<scalar_t, acc_t, RatioPath<double>, true>(launch, s_ptr, t_ptr, hard_teacher, keep_gt);
      launch_path<scalar_t, acc_t, SmallSpreadPath<double>, false>(launch, s_ptr, t_ptr, hard_teacher, keep_gt);
    }
    launch_path<scalar_t, acc_t, DirectPath, false>(launch, s_ptr, t_ptr, hard_teacher, keep_gt);

    const int64_t work = std::max<int64_t>(rows * ((need_grad_s || need_grad_t) ? c : 1), 1);
    const int finish_blocks = int(std::min<int64_t>((work + kFinishThreads - 1) / kFinishThreads,
                                                    int64_t(sms) * 32));
    finish_rows<acc_t><<<finish_blocks, kFinishThreads, 0, stream>>>(
        plan_ptr, static_cast<acc_t*>(scratch.mutable_data_ptr()),
        static_cast<acc_t*>(tau_scratch.mutable_data_ptr()), rows, c, k, hard_teacher, splits,
        sums_per_row, static_cast<acc_t*>(loss.mutable_data_ptr()),
        need_grad_s ? static_cast<acc_t*>(grad_s.mutable_data_ptr()) : nullptr,
        need_grad_t ? static_cast<acc_t*>(grad_t.mutable_data_ptr()) : nullptr);
    check_launch();
  });
  return {loss, grad_s, grad_t};
}

}  // namespace
}  // namespace rkkd

STABLE_TORCH_LIBRARY_IMPL(rkkd, CUDA, m) {
  m.impl("kendall", TORCH_BOX(&rkkd::kendall_cuda));
}
