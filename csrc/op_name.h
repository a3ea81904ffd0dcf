// The names under which a compiled library registers its ops. The CPU library is built once per
// ISA variant (-march=x86-64-v3, x86-64-v4, ...) and several variants may be loaded in one process,
// so each registers its ops under its own name: RKKD_CPU_OP("kendall") is "_kendall_cpu_x86_64_v4"
// in the build that rkkd_kernels/_ext.py makes with -DRKKD_ISA=x86_64_v4. The public op
// rkkd::kendall (schema in rkkd_kernels/ops.py) has Python kernels that call these.
#pragma once

#define RKKD_STRINGIFY_(x) #x
#define RKKD_STRINGIFY(x) RKKD_STRINGIFY_(x)
// Only the CPU builds define RKKD_ISA (rkkd_kernels/_ext.py and setup.py do).
#ifdef RKKD_ISA
#define RKKD_CPU_OP(name) "_" name "_cpu_" RKKD_STRINGIFY(RKKD_ISA)
#endif
#define RKKD_CUDA_OP(name) "_" name "_cuda"
