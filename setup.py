"""Builds the compiled parts of rkkd_kernels (ninja).

- ``rkkd_kernels._cpu``: the C++ CPU kernel, always (-O3, OpenMP, the build machine's SIMD).
- ``rkkd_kernels._cuda``: the CUDA kernel, where torch has CUDA and nvcc is found. A failed or
  skipped CUDA build never breaks the CPU one; the reason is printed, and
  ``rkkd_kernels.available_backends()`` reports it at run time.

Environment: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"), ``CUDA_HOME`` (default: found from nvcc),
``RKKD_CPU_ARCH`` (default "native"; e.g. "x86-64-v3" for a portable AVX2 build),
``RKKD_SKIP_CUDA=1`` to build the CPU part alone.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return "/usr/local/cuda" if os.path.exists("/usr/local/cuda/bin/nvcc") else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if _cuda_home():
    os.environ.setdefault("CUDA_HOME", _cuda_home())
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvidia_include_dirs():
    """The CUDA headers that pip's nvidia packages ship (cu13 keeps them in nvidia/cu13/include)."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def _why_no_cuda():
    if os.environ.get("RKKD_SKIP_CUDA") == "1":
        return "RKKD_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if _cuda_home() is None or not os.path.exists(os.path.join(_cuda_home(), "bin", "nvcc")):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


CPU_ARCH = os.environ.get("RKKD_CPU_ARCH", "native")
csrc = os.path.join(HERE, "csrc")

extensions = [
    CppExtension(
        "rkkd_kernels._cpu",
        ["csrc/kendall_cpu.cpp"],
        include_dirs=[csrc],
        extra_compile_args=["-O3", f"-march={CPU_ARCH}", "-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
]

WHY_NO_CUDA = _why_no_cuda()
if WHY_NO_CUDA is None:
    extensions.append(
        CUDAExtension(
            "rkkd_kernels._cuda",
            ["csrc/kendall_cuda.cu"],
            include_dirs=[csrc] + _nvidia_include_dirs(),
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        )
    )
else:
    print(f"rkkd_kernels: building the CPU kernel only: {WHY_NO_CUDA}", file=sys.stderr)


class OptionalCudaBuild(BuildExtension):
    """Builds each extension on its own, so that a CUDA failure leaves the CPU kernel working."""

    def build_extension(self, ext):
        if not ext.name.endswith("_cuda"):
            return super().build_extension(ext)
        if not os.path.exists(os.path.join(HERE, "csrc", "kendall_cuda.cu")):
            print("rkkd_kernels: csrc/kendall_cuda.cu is absent; CUDA kernel skipped", file=sys.stderr)
            return None
        try:
            return super().build_extension(ext)
        except Exception as err:  # report and go on: the CPU part must still install
            print(f"rkkd_kernels: the CUDA kernel failed to build ({err}); CPU only", file=sys.stderr)
            return None


setup(
    name="rkkd_kernels",
    version="0.1.0",
    description="Fast, exact pairwise soft-Kendall ranking loss for knowledge distillation (RKKD)",
    packages=find_packages(include=["rkkd_kernels", "rkkd_kernels.*"]),
    ext_modules=extensions,
    cmdclass={"build_ext": OptionalCudaBuild.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
)
