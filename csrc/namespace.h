// The namespace of the kernels' code. The CPU library compiles its kernels once per ISA variant
// (-march=x86-64-v4, x86-64-v3, x86-64) into one shared library, each with RKKD_CPU_VARIANT set to
// the variant's name: every function and template of pair_math.h, simd.h, expsum.h and the kernel
// files then lives in the inline namespace rkkd::<variant>, so no two variants define a symbol of
// the same name, and the linker can never hand one variant's (AVX-512) copy of an inline function
// to another (PyTorch's CPU_CAPABILITY pattern; tests/test_build.py checks the objects). The CUDA
// kernel and the plain CPU file use rkkd:: itself.
#pragma once

#ifdef RKKD_CPU_VARIANT
#define RKKD_NAMESPACE_BEGIN \
  namespace rkkd {           \
  inline namespace RKKD_CPU_VARIANT {
#define RKKD_NAMESPACE_END \
  }                        \
  }
#else
#define RKKD_NAMESPACE_BEGIN namespace rkkd {
#define RKKD_NAMESPACE_END }
#endif
