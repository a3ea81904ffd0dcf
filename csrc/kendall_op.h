// The C++ side of the rkkd::kendall contract (schema and meaning in rkkd_kernels/ops.py), shared by
// the CPU and CUDA libraries: the checks at the boundary and the outputs' shapes and dtypes, on the
// LibTorch stable ABI (torch/csrc/stable), so one binary serves every torch from the target on.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>

namespace rkkd {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// float64 stays float64; float16, bfloat16 and float32 accumulate (and answer) in float32.
template <typename scalar_t>
using accumulate_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

inline ScalarType accumulation_type(ScalarType input) {
  return input == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// "(3, 7)": STD_TORCH_CHECK streams numbers and strings only.
inline std::string shape_of(const Tensor& t) {
  std::string out = "(";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + (t.dim() == 1 ? ",)" : ")");
}

inline std::string device_of(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  return (t.is_cuda() ? "cuda:" : "device:") + std::to_string(t.get_device_index());
}

// The Python API validates before it gets here (rkkd_kernels/loss.py); these guard direct calls
// of the op, with the same rules.
inline void check_kendall_inputs(const Tensor& student, const Tensor& teacher, double k) {
  bool same_shape = student.dim() == 2 && teacher.dim() == 2;
  for (int64_t d = 0; same_shape && d < 2; ++d) same_shape = student.size(d) == teacher.size(d);
  STD_TORCH_CHECK(same_shape, "rkkd::kendall expects two (rows, C) tensors of one shape, got ",
                  shape_of(student), " and ", shape_of(teacher));
  STD_TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "rkkd::kendall expects one dtype, got ",
                  torch::headeronly::toString(student.scalar_type()), " and ",
                  torch::headeronly::toString(teacher.scalar_type()));
  STD_TORCH_CHECK(device_of(student) == device_of(teacher),
                  "rkkd::kendall expects both tensors on one device, got ", device_of(student),
                  " and ", device_of(teacher));
  STD_TORCH_CHECK(student.size(1) >= 2, "rkkd::kendall needs C >= 2, got ", student.size(1));
  STD_TORCH_CHECK(std::isfinite(k) && k > 0, "rkkd::kendall needs a positive finite k, got ", k);
}

// (loss_rows, grad_student, grad_teacher): a gradient not asked for is an empty (0,) tensor.
inline std::tuple<Tensor, Tensor, Tensor> allocate_outputs(const Tensor& student, bool need_grad_s,
                                                           bool need_grad_t) {
  const int64_t rows = student.size(0), c = student.size(1);
  const ScalarType acc = accumulation_type(student.scalar_type());
  using Shape = torch::headeronly::IntHeaderOnlyArrayRef;
  const int64_t row_shape[] = {rows}, grad_shape[] = {rows, c}, none[] = {0};
  auto grad = [&](bool needed) {
    return torch::stable::new_empty(student, needed ? Shape(grad_shape) : Shape(none), acc);
  };
  return {torch::stable::new_empty(student, Shape(row_shape), acc), grad(need_grad_s), grad(need_grad_t)};
}

}  // namespace rkkd
