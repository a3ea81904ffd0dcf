// What every translation unit of a CPU ISA variant shares (compiled with RKKD_CPU_VARIANT set, so
// all of it lives in that variant's namespace, namespace.h): a growable buffer, torch's parallel
// loop for lambdas, and the 16-bit input types with their exact widening to float.
//
// Variant code includes no torch header and no std container: their inline functions would be
// compiled once per variant under one name each, and the linker would keep one copy for all.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "cpu_kernels.h"
#include "namespace.h"

RKKD_NAMESPACE_BEGIN

// A heap array that keeps its contents when it grows; elements a resize adds are zero (as
// std::vector's).
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { resize(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { delete[] data_; }

  void resize(int64_t n) {
    if (n > capacity_) {
      T* grown = new T[n]();
      if (size_ > 0) std::memcpy(static_cast<void*>(grown), data_, sizeof(T) * size_);
      delete[] data_;
      data_ = grown;
      capacity_ = n;
    } else if (n > size_) {
      std::memset(static_cast<void*>(data_ + size_), 0, sizeof(T) * (n - size_));
    }
    size_ = n;
  }
  void assign(int64_t n, T value) {
    resize(n);
    for (int64_t i = 0; i < n; ++i) data_[i] = value;
  }
  void push_back(T value) {
    if (size_ == capacity_) {
      const int64_t size = size_;
      resize(capacity_ > 0 ? 2 * capacity_ : 64);
      size_ = size;
    }
    data_[size_++] = value;
  }
  void clear() { size_ = 0; }
  void swap(Buffer& other) {
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    std::swap(capacity_, other.capacity_);
  }
  bool empty() const { return size_ == 0; }
  int64_t size() const { return size_; }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T* begin() { return data_; }
  T* end() { return data_ + size_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
  int64_t capacity_ = 0;
};

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
