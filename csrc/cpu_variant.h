// What every translation unit of a CPU ISA variant shares (compiled with RKKD_CPU_VARIANT set, so
// all of it lives in that variant's namespace, namespace.h): a growable buffer, torch's parallel
// loop for lambdas, and the 16-bit input types with their exact widening to float.
//
// Variant code includes no torch header and no std container of std::allocator: their inline
// functions would be compiled once per variant under one name each, and the linker would keep one
// copy for all (tests/test_build.py checks that no variant object shares a symbol).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "cpu_kernels.h"
#include "namespace.h"

RKKD_NAMESPACE_BEGIN

// The variants' containers: std::vector with an allocator of the variant's own namespace, so that
// every member of the vector (and of the std:: helpers it instantiates) has a name of this variant.
template <typename T>
struct VariantAllocator {
  using value_type = T;
  VariantAllocator() = default;
  template <typename U>
  VariantAllocator(const VariantAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T))); }
  void deallocate(T* p, std::size_t) { ::operator delete(p); }
  template <typename U>
  bool operator==(const VariantAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const VariantAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, VariantAllocator<T>>;

// at::parallel_for over [begin, end) for a lambda `f(begin, end)`.
template <typename F>
void parallel_rows(int64_t begin, int64_t end, int64_t grain, const F& f) {
  parallel_for(
      begin, end, grain,
      [](void* context, int64_t b, int64_t e) { (*static_cast<const F*>(context))(b, e); },
      const_cast<void*>(static_cast<const void*>(&f)));
}

template <typename To, typename From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "same size");
  To out;
  std::memcpy(&out, &v, sizeof(To));
  return out;
}

// IEEE binary16 as stored by torch.float16; widening to float is exact, as is torch's own.
struct Float16 {
  uint16_t bits;
  operator float() const {
    const uint32_t sign = uint32_t(bits & 0x8000u) << 16;
    const uint32_t magnitude = bits & 0x7fffu;
    if (magnitude >= 0x7c00u)  // inf or NaN: all-ones exponent, the payload kept
      return bit_cast<float>(sign | 0x7f800000u | ((magnitude & 0x3ffu) << 13));
    if (magnitude >= 0x0400u)  // normal: rebias the exponent (15 -> 127)
      return bit_cast<float>(sign | ((magnitude << 13) + (uint32_t(127 - 15) << 23)));
    // zero or subnormal: magnitude * 2^-24, exact in float
    return bit_cast<float>(sign | bit_cast<uint32_t>(float(magnitude) * 5.9604644775390625e-8f));
  }
};

// bfloat16: the upper half of a float32.
struct BFloat16 {
  uint16_t bits;
  operator float() const { return bit_cast<float>(uint32_t(bits) << 16); }
};

// Calls f(scalar_t{}, acc_t{}) with the input type and its accumulation type.
template <typename F>
void dispatch_input_type(InputType type, const F& f) {
  switch (type) {
    case InputType::kHalf: return f(Float16{}, float{});
    case InputType::kBFloat16: return f(BFloat16{}, float{});
    case InputType::kFloat: return f(float{}, float{});
    case InputType::kDouble: return f(double{}, double{});
  }
}

// The pair kernel of this variant (kendall_cpu.cpp), which the exponential-sum kernel calls for
// the rows beyond its lattice.
void kendall_pairs(const KendallArgs& args);
void kendall_expsum(const KendallArgs& args);

RKKD_NAMESPACE_END
