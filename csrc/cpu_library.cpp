// The CPU library's plain file: compiled once, for the baseline of the machine, with no ISA flag.
// It holds everything that is not the kernels' arithmetic: the checks at the op boundary and the
// outputs (kendall_op.h), the choice of ISA variant (once, when the library loads, from the CPU's
// features), the registration of that variant as the CPU kernel of rkkd::kendall and
// rkkd::kendall_expsum (schemas in rkkd_kernels/ops.py and expsum.py), torch's thread pool for the
// variants (cpu_kernels.h), and a few C functions that rkkd_kernels/_ext.py reads with ctypes.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <atomic>
#include <cstring>
#include <string>
#include <tuple>

#include "cpu_kernels.h"
#include "kendall_op.h"


namespace rkkd {

void parallel_for(int64_t begin, int64_t end, int64_t grain, ParallelBody body, void* context) {
  torch::stable::parallel_for(begin, end, grain,
                              [&](int64_t b, int64_t e) { body(context, b, e); });
}

int64_t num_threads() { return int64_t(torch::stable::get_num_threads()); }

namespace {

struct NamedVariant {
  const char* name;  // the -march level the variant was compiled for
  const CpuVariant* kernels;
  bool (*runs_here)();
};

// Best first. __builtin_cpu_supports asks CPUID and, for AVX and AVX-512, whether the OS saves
// their registers (XGETBV).
#if defined(__x86_64__) || defined(_M_X64)
const NamedVariant kVariants[] = {
    {"x86-64-v4", &x86_64_v4::kVariant, [] { return bool(__builtin_cpu_supports("x86-64-v4")); }},
    {"x86-64-v3", &x86_64_v3::kVariant, [] { return bool(__builtin_cpu_supports("x86-64-v3")); }},
    {"x86-64", &x86_64::kVariant, [] { return true; }},
};
#else
const NamedVariant kVariants[] = {{"generic", &generic::kVariant, [] { return true; }}};
#endif
constexpr int kVariantCount = int(sizeof(kVariants) / sizeof(kVariants[0]));

int best_variant() {
  for (int i = 0; i < kVariantCount; ++i) {
    if (kVariants[i].runs_here()) return i;
  }
  return kVariantCount - 1;
}

// The variant in use: chosen once at load; only the private op rkkd::_force_cpu_variant (for the
// tests) changes it.
std::atomic<int> active_variant{best_variant()};

ScalarType checked_input(const Tensor& student, const Tensor& teacher, double k) {
  check_kendall_inputs(student, teacher, k);
  STD_TORCH_CHECK(student.is_cpu(), "rkkd::kendall (CPU) expects CPU tensors, got ",
                  device_of(student));
  return student.scalar_type();
}

InputType input_type(ScalarType type) {
  switch (type) {
    case ScalarType::Half: return InputType::kHalf;
    case ScalarType::BFloat16: return InputType::kBFloat16;
    case ScalarType::Float: return InputType::kFloat;
    case ScalarType::Double: return InputType::kDouble;
    default:
      STD_TORCH_CHECK(false, "rkkd::kendall takes float16, bfloat16, float32 or float64, got ",
                      torch::headeronly::toString(type));
  }
  return InputType::kFloat;
}

using Outputs = std::tuple<Tensor, Tensor, Tensor>;

Outputs run(void (*CpuVariant::*kernel)(const KendallArgs&), const Tensor& student,
            const Tensor& teacher, double k, bool hard_teacher, bool need_grad_s, bool need_grad_t) {
  const InputType type = input_type(checked_input(student, teacher, k));
  const Tensor s = torch::stable::contiguous(student);
  const Tensor t = torch::stable::contiguous(teacher);
  auto [loss, grad_s, grad_t] = allocate_outputs(s, need_grad_s, need_grad_t);
  const KendallArgs args{type,
                         s.const_data_ptr(),
                         t.const_data_ptr(),
                         s.size(0),
                         s.size(1),
                         k,
                         hard_teacher,
                         loss.mutable_data_ptr(),
                         need_grad_s ? grad_s.mutable_data_ptr() : nullptr,
                         need_grad_t ? grad_t.mutable_data_ptr() : nullptr};
  (kVariants[active_variant.load()].kernels->*kernel)(args);
  return {loss, grad_s, grad_t};
}

Outputs kendall_cpu(Tensor student, Tensor teacher, double k, bool hard_teacher, bool need_grad_s,
                    bool need_grad_t) {
  return run(&CpuVariant::kendall, student, teacher, k, hard_teacher, need_grad_s, need_grad_t);
}

Outputs kendall_expsum_cpu(Tensor student, Tensor teacher, double k, bool hard_teacher,
                           bool need_grad_s, bool need_grad_t) {
  STD_TORCH_CHECK(hard_teacher,
                  "rkkd::kendall_expsum computes the hard-teacher loss only (hard_teacher=True)");
  auto out = run(&CpuVariant::kendall_expsum, student, teacher, k, hard_teacher, need_grad_s,
                 need_grad_t);
  // The kernel writes the student's gradient only: a hard teacher's is zero.
  if (need_grad_t) torch::stable::zero_(std::get<2>(out));
  return out;
}

// The variants' names, best first, comma-separated: all of them, or those this CPU runs.
std::string variant_names(bool only_supported) {
  std::string out;
  for (const auto& v : kVariants) {
    if (!only_supported || v.runs_here()) out += (out.empty() ? "" : ",") + std::string(v.name);
  }
  return out;
}

// Tests run every variant this CPU supports: this switches the variant in use (process-wide) and
// returns the one it replaces. A variant this CPU cannot run is refused, never run.
std::string force_cpu_variant(std::string name) {
  for (int i = 0; i < kVariantCount; ++i) {
    if (name != kVariants[i].name) continue;
    STD_TORCH_CHECK(kVariants[i].runs_here(), "this CPU cannot run the ", name,
                    " variant of the rkkd CPU kernel");
    return kVariants[active_variant.exchange(i)].name;
  }
  STD_TORCH_CHECK(false, "no CPU variant named ", name, " in this build");
  return "";
}

}  // namespace
}  // namespace rkkd

STABLE_TORCH_LIBRARY_IMPL(rkkd, CPU, m) {
  m.impl("kendall", TORCH_BOX(&rkkd::kendall_cpu));
  m.impl("kendall_expsum", TORCH_BOX(&rkkd::kendall_expsum_cpu));
}

STABLE_TORCH_LIBRARY_IMPL(rkkd, CompositeExplicitAutograd, m) {
  m.impl("_force_cpu_variant", TORCH_BOX(&rkkd::force_cpu_variant));
}

// Read by rkkd_kernels/_ext.py (ctypes) for `python -m rkkd_kernels` and the tests: the variants
// compiled in (best first, comma-separated), those this CPU runs, and the one in use.
extern "C" {
__attribute__((visibility("default"))) const char* rkkd_cpu_variants_compiled() {
  static const std::string names = rkkd::variant_names(false);
  return names.c_str();
}
__attribute__((visibility("default"))) const char* rkkd_cpu_variants_supported() {
  static const std::string names = rkkd::variant_names(true);
  return names.c_str();
}
__attribute__((visibility("default"))) const char* rkkd_cpu_variant_in_use() {
  return rkkd::kVariants[rkkd::active_variant.load()].name;
}
}
