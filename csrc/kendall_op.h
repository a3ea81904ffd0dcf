// The C++ side of the rkkd::kendall contract (schema and meaning in rkkd_kernels/ops.py), shared by
// the CPU and CUDA kernels: the checks at the boundary and the outputs' shapes and dtypes.
#pragma once

#include <torch/types.h>

#include <cmath>
#include <tuple>
#include <type_traits>

namespace rkkd {

// float64 stays float64; float16, bfloat16 and float32 accumulate (and answer) in float32.
template <typename scalar_t>
using accumulate_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

inline at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The Python API validates before it gets here; these guard direct calls of the op.
inline void check_kendall_inputs(const at::Tensor& student, const at::Tensor& teacher, double k) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "rkkd::kendall expects two (rows, C) tensors of one shape, got ", student.sizes(),
              " and ", teacher.sizes());
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(),
              "rkkd::kendall expects one dtype, got ", student.scalar_type(), " and ",
              teacher.scalar_type());
  TORCH_CHECK(student.device() == teacher.device(),
              "rkkd::kendall expects both tensors on one device, got ", student.device(), " and ",
              teacher.device());
  TORCH_CHECK(student.size(1) >= 2, "rkkd::kendall needs C >= 2, got ", student.size(1));
  TORCH_CHECK(std::isfinite(k) && k > 0, "rkkd::kendall needs a positive finite k, got ", k);
}

// (loss_rows, grad_student, grad_teacher): a gradient not asked for is an empty (0,) tensor.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& student,
                                                                       bool need_grad_s,
                                                                       bool need_grad_t) {
  const int64_t rows = student.size(0), c = student.size(1);
  const auto opts = student.options().dtype(accumulation_type(student.scalar_type()));
  return {at::empty({rows}, opts),
          need_grad_s ? at::empty({rows, c}, opts) : at::empty({0}, opts),
          need_grad_t ? at::empty({rows, c}, opts) : at::empty({0}, opts)};
}

}  // namespace rkkd
