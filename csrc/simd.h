// SIMD building blocks shared by the CPU kernels (kendall_cpu.cpp, kendall_expsum_cpu.cpp):
// GCC/Clang vector types as wide as the build's widest register, unaligned loads and stores, and
// the sum of a vector's lanes. Each ISA variant is its own build, so kVectorBytes is fixed per
// binary.
#pragma once

#include "namespace.h"

#include <cstddef>
#include <cstring>
#include <type_traits>
#include <utility>

RKKD_NAMESPACE_BEGIN

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;
#endif

// Vec<T, N>: N lanes of T; by default as many as fill one register.
template <typename T, int N>
struct VecOf {
  typedef T type __attribute__((vector_size(N * sizeof(T))));
};
template <typename T, int N = kVectorBytes / int(sizeof(T))>
using Vec = typename VecOf<T, N>::type;

// Loads and stores through memcpy: no alignment asked, and no aliasing assumption broken; the
// compiler turns them into single vector moves.
template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename T, typename V>
inline void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Sum of a vector's lanes by halving (log2(width) steps), not lane after lane: it runs once per
// row element, where a serial chain of width - 1 dependent adds would cost as much as a short
// inner loop. Shuffles, not memcpy, so that the accumulators stay in registers.
template <typename Half, typename V, size_t... L>
inline Half fold_halves(V v, std::index_sequence<L...>) {
  return __builtin_shufflevector(v, v, L...) + __builtin_shufflevector(v, v, (L + sizeof...(L))...);
}

template <typename V>
inline auto lane_sum(V v) -> std::remove_reference_t<decltype(v[0])> {
  using T = std::remove_reference_t<decltype(v[0])>;
  constexpr int kLanes = int(sizeof(V) / sizeof(T));
  if constexpr (kLanes == 1) {
    return v[0];
  } else {
    return lane_sum(fold_halves<Vec<T, kLanes / 2>>(v, std::make_index_sequence<kLanes / 2>{}));
  }
}

RKKD_NAMESPACE_END
