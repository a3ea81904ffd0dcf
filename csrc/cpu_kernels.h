// The seam between the CPU library's plain file (cpu_library.cpp: checks, allocation, the choice
// of variant, registration with torch) and its ISA variants (kendall_cpu.cpp and
// kendall_expsum_cpu.cpp, compiled once per variant). Declarations only: no inline code here, so
// nothing in this file can be compiled twice with different instructions.
#pragma once

#include <cstdint>

namespace rkkd {

// The input dtypes the kernels take; float16 and bfloat16 accumulate in float32 (kendall_op.h).
enum class InputType : int32_t { kHalf, kBFloat16, kFloat, kDouble };

// One call of a kernel on (rows, C) contiguous inputs. Outputs are in the accumulation type
// (float64 for float64 inputs, float32 otherwise); a gradient not asked for is null.
struct KendallArgs {
  InputType type;
  const void* student;
  const void* teacher;
  int64_t rows;
  int64_t c;
  double k;
  bool hard_teacher;
  void* loss;
  void* grad_student;
  void* grad_teacher;
};

// One ISA variant's kernels.
struct CpuVariant {
  void (*kendall)(const KendallArgs&);
  // Hard teacher only; grad_teacher is left to the caller (zeros).
  void (*kendall_expsum)(const KendallArgs&);
};

// What the variants need of torch, provided by the plain file: torch's intra-op thread pool
// (at::parallel_for through the stable ABI) and its size.
using ParallelBody = void (*)(void* context, int64_t begin, int64_t end);
void parallel_for(int64_t begin, int64_t end, int64_t grain, ParallelBody body, void* context);
int64_t num_threads();

// The variants compiled into the library, each defined by its own translation units (for the
// plain file: a variant's own units open its namespace as inline, namespace.h).
#ifndef RKKD_CPU_VARIANT
#if defined(__x86_64__) || defined(_M_X64)
namespace x86_64_v4 { extern const CpuVariant kVariant; }
namespace x86_64_v3 { extern const CpuVariant kVariant; }
namespace x86_64 { extern const CpuVariant kVariant; }
#else
namespace generic { extern const CpuVariant kVariant; }
#endif
#endif

}  // namespace rkkd
