"""Builds the compiled parts of rkkd_kernels (ninja).

- ``rkkd_kernels._cpu``: the C++ CPU kernel, always (-O3, OpenMP, the build machine's SIMD).
- ``rkkd_kernels._cuda``: the CUDA kernel, where torch has CUDA and nvcc is found. A failed or
  skipped CUDA build never breaks the CPU one: the reason is printed, a stale ``_cuda`` library is
  removed, and ``rkkd_kernels.available_backends()`` reports the backend missing at run time.

Environment: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0+PTX": A100 and H100/H200 code, plus PTX that
newer GPUs compile at load time), ``CUDA_HOME`` (default: the toolkit of the nvcc on PATH, found
even through a wrapper script), ``RKKD_CPU_ARCH`` (default "native"; e.g. "x86-64-v3" for a
portable AVX2 build), ``RKKD_SKIP_CUDA=1`` to build the CPU part alone.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(root):
    """A CUDA toolkit root: nvcc and the runtime headers that torch's build adds to the paths."""
    return bool(root) and all(
        os.path.exists(os.path.join(root, *p))
        for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


def _toolkit_behind(nvcc):
    """The toolkit an nvcc on PATH belongs to; a wrapper script (``exec /opt/cuda/bin/nvcc``) is
    seen through by asking nvcc where it runs from (its --dryrun prints ``_HERE_=<bin dir>``)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(root):
        return root
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        root = os.path.dirname(os.path.realpath(match.group(1).strip()))
        if _is_toolkit(root):
            return root
    return None


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_behind(nvcc)
        if root:
            return root
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


CUDA_HOME = _find_cuda_home()
# torch.utils.cpp_extension reads CUDA_HOME when it is imported.
if CUDA_HOME:
    os.environ["CUDA_HOME"] = CUDA_HOME
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvidia_include_dirs():
    """The CUDA headers that pip's nvidia packages ship (cu13 keeps them in nvidia/cu13/include)."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def _nvcc_release(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _why_no_cuda():
    if os.environ.get("RKKD_SKIP_CUDA") == "1":
        return "RKKD_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None
    if nvcc is None or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    release = _nvcc_release(nvcc)
    if release is None:
        return f"{nvcc} --version does not say its release"
    torch_major = int(torch.version.cuda.split(".")[0])
    if release[0] != torch_major:  # torch refuses to build across CUDA major versions
        return (f"nvcc {release[0]}.{release[1]} ({nvcc}) cannot build for torch's CUDA "
                f"{torch.version.cuda}; install a CUDA {torch_major}.x toolkit")
    return None


CPU_ARCH = os.environ.get("RKKD_CPU_ARCH", "native")
csrc = os.path.join(HERE, "csrc")

extensions = [
    CppExtension(
        "rkkd_kernels._cpu",
        ["csrc/kendall_cpu.cpp", "csrc/kendall_expsum_cpu.cpp"],
        include_dirs=[csrc],
        extra_compile_args=["-O3", f"-march={CPU_ARCH}", "-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
]

WHY_NO_CUDA = _why_no_cuda()
if WHY_NO_CUDA is None:
    # pip's nvidia headers come after the toolkit's own (-isystem is searched after every -I), so
    # they only fill in what a slim toolkit lacks. No --use_fast_math: it would flush subnormals
    # (a hard teacher's sign of a tiny difference) and coarsen exp; the kernel asks for its fast
    # reciprocal explicitly (pair_math.h).
    nvcc_flags = ["-O3", "-lineinfo"]
    for d in _nvidia_include_dirs():
        nvcc_flags += ["-isystem", d]
    extensions.append(
        CUDAExtension(
            "rkkd_kernels._cuda",
            ["csrc/kendall_cuda.cu"],
            include_dirs=[csrc],
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc_flags},
            optional=True,  # setuptools then skips copying it in place when it was not built
        )
    )
    print(f"rkkd_kernels: building the CUDA kernel with {CUDA_HOME}/bin/nvcc for "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
else:
    print(f"rkkd_kernels: building the CPU kernel only: {WHY_NO_CUDA}", file=sys.stderr)


def _is_cuda(ext):
    return ext.name.endswith("._cuda")


class OptionalCudaBuild(BuildExtension):
    """Builds each extension on its own, so that a CUDA failure leaves the CPU kernel working."""

    def build_extensions(self):
        try:
            super().build_extensions()
        except Exception as err:
            # torch checks the CUDA toolchain (nvcc and host compiler versions) for all extensions
            # before building any; when that check fails, build the CPU kernel without CUDA.
            if not any(_is_cuda(e) for e in self.extensions):
                raise
            self._remove_cuda_libraries(f"the CUDA toolchain check failed: {err}")
            self.extensions = [e for e in self.extensions if not _is_cuda(e)]
            super().build_extensions()

    def build_extension(self, ext):
        if not _is_cuda(ext):
            return super().build_extension(ext)
        try:
            return super().build_extension(ext)
        except Exception as err:  # report and go on: the CPU part must still install
            self._remove_cuda_libraries(f"the CUDA kernel failed to build: {err}")
            return None

    def _remove_cuda_libraries(self, why):
        """Delete the CUDA library of an earlier build, in build/ and in place, so that nothing
        stale is copied or loaded: rkkd_kernels then reports the CUDA backend as not built (the
        extension is optional, so setuptools copies nothing in place when its file is absent)."""
        for ext in [e for e in self.extensions if _is_cuda(e)]:
            name = self.get_ext_filename(ext.name)
            for path in {os.path.join(self.build_lib, name), os.path.join(HERE, name)}:
                if os.path.exists(path):
                    os.remove(path)
                    print(f"rkkd_kernels: removed the stale {path}", file=sys.stderr)
        print(f"rkkd_kernels: {why}\nrkkd_kernels: building the CPU kernel only", file=sys.stderr)


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
