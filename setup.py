"""Builds the compiled kernels of rkkd-kernels into the package (metadata in pyproject.toml).

The kernels are written against the LibTorch stable ABI (torch/csrc/stable, targeting torch 2.10),
so one binary loads into every torch from 2.10 on, and the wheel is tagged abi3 (cp310: the lowest
Python that torch 2.10 supports). Nothing is compiled when the package is used.

- ``rkkd_kernels/_C.abi3.so``, the CPU library: the plain file ``csrc/cpu_library.cpp`` (checks,
  registration, the choice of variant at load) and the kernels compiled once per ISA variant,
  each into its own namespace (csrc/namespace.h): on x86-64 ``-march=x86-64-v4`` (AVX-512),
  ``x86-64-v3`` (AVX2 + FMA) and ``x86-64``, the baseline that every x86-64 CPU runs; elsewhere one
  variant for the compiler's default target.
- ``rkkd_kernels/_cuda.abi3.so``, the CUDA kernel, where nvcc is found (``RKKD_BUILD_CUDA=0`` or
  ``1`` forces either way), for ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0+PTX"), with the CUDA
  runtime linked statically (the wheel then needs only the driver).
- ``rkkd_kernels/_build_info.json``: what was built, for which torch, and why the CUDA kernel is
  absent if it is (``python -m rkkd_kernels`` and ``available_backends()`` report it).

In a clone, ``python setup.py build_ext --inplace`` (what ``make test`` runs) rebuilds only what
changed: each variant object against its sources and headers, each library against its inputs.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
PACKAGE = "rkkd_kernels"

# The stable ABI version the kernels target (TORCH_TARGET_VERSION): 2.10 is the first with every
# call they make (parallel_for, get_num_threads, new_empty with a dtype, zero_, contiguous).
TORCH_TARGET = (2, 10)
TORCH_TARGET_FLAG = f"-DTORCH_TARGET_VERSION=0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"
# torch 2.10 supports Python >= 3.10: the abi3 wheel is tagged for it.
LIMITED_API = "cp310"

# The kernels' flags besides -march. No -ffast-math: the kernels rely on IEEE semantics (NaN rows,
# exact signs); -fno-math-errno only lets std::exp and friends vectorise. -fno-wrapv undoes the
# -fwrapv that Python's own CFLAGS bring, which changes the code of the hot loops.
VARIANT_FLAGS = ["-std=c++20", "-O3", "-fPIC", "-fno-math-errno", "-fno-wrapv", "-fvisibility=hidden",
                 "-Wno-psabi"]
# (variant name, -march value or None for the compiler's default), best first.
X86_VARIANTS = [("x86-64-v4", "x86-64-v4"), ("x86-64-v3", "x86-64-v3"), ("x86-64", "x86-64")]
GENERIC_VARIANTS = [("generic", None)]
VARIANT_SOURCES = ["kendall_cpu.cpp", "kendall_expsum_cpu.cpp"]
VARIANT_HEADERS = ["cpu_kernels.h", "cpu_variant.h", "namespace.h", "pair_math.h", "simd.h", "expsum.h"]
CPU_LIBRARY_SOURCES = ["cpu_library.cpp"]
CPU_LIBRARY_HEADERS = ["cpu_kernels.h", "kendall_op.h"]
CUDA_SOURCES = ["kendall_cuda.cu"]
CUDA_HEADERS = ["kendall_op.h", "namespace.h", "pair_math.h"]
# No --use_fast_math: it would flush subnormals (a hard teacher's sign of a tiny difference) and
# coarsen exp; the kernel asks for its fast reciprocal explicitly (pair_math.h).
NVCC_FLAGS = ["-O3", "-lineinfo"]
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def cpu_variants():
    is_x86 = platform.machine().lower() in ("x86_64", "amd64")
    return X86_VARIANTS if is_x86 else GENERIC_VARIANTS


def variant_token(name):
    """The variant's name as a C++ namespace: x86-64-v4 -> x86_64_v4."""
    return re.sub(r"\W", "_", name)


def csrc(names):
    return [os.path.join(CSRC, n) for n in names]


# ------------------------------------------------------------------------------------------------
# CUDA: where the toolkit is, and whether to build the CUDA library here.


def _is_toolkit(root):
    return bool(root) and all(os.path.exists(os.path.join(root, *p))
                              for p in (("bin", "nvcc"), ("include", "cuda_runtime.h")))


def find_cuda_home():
    """CUDA_HOME, else the toolkit of the nvcc on PATH, seen through a wrapper script
    (``exec /opt/cuda/bin/nvcc``: nvcc --dryrun prints the folder it runs from), else
    /usr/local/cuda. torch's own guess stops at the wrapper's folder."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if _is_toolkit(root):
            return root
        try:
            out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60)
            match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
            if match and _is_toolkit(os.path.dirname(os.path.realpath(match.group(1).strip()))):
                return os.path.dirname(os.path.realpath(match.group(1).strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def why_no_cuda(torch, cuda_home):
    """None when the CUDA library is to be built here, else why not (recorded in the package)."""
    flag = os.environ.get("RKKD_BUILD_CUDA")
    if flag == "0":
        return "the package was built with RKKD_BUILD_CUDA=0"
    if torch.version.cuda is None:
        problem = f"the package was built against torch {torch.__version__}, a CPU-only build"
    elif cuda_home is None:
        problem = "no nvcc was found where the package was built (set CUDA_HOME or put nvcc on PATH)"
    else:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True).stdout
        release = re.search(r"release (\d+)\.(\d+)", out)
        torch_major = torch.version.cuda.split(".")[0]
        problem = None if release and release.group(1) == torch_major else (
            f"nvcc in {cuda_home} ({release.group(0) if release else 'release unknown'}) cannot "
            f"build for torch's CUDA {torch.version.cuda}")
    if problem and flag == "1":
        sys.exit(f"RKKD_BUILD_CUDA=1, but {problem}")
    return problem


def nvidia_include_dirs():
    """The CUDA headers that pip's nvidia packages ship (cu13 keeps them in nvidia/cu13/include):
    searched after the toolkit's own, so they only fill in what a slim toolkit lacks."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def nvcc_flags():
    """nvcc's flags for csrc/kendall_cuda.cu (benchmarks/sass_loop.py compiles it with them too).
    USE_CUDA declares the shim's current-stream call."""
    flags = list(NVCC_FLAGS) + [TORCH_TARGET_FLAG, "-DUSE_CUDA"]
    for d in nvidia_include_dirs():
        flags += ["-isystem", d]
    return flags


# ------------------------------------------------------------------------------------------------
# The ISA variants: compiled here, each with its own flags (setuptools takes one flag set per
# extension), and linked into the CPU library as extra objects.


def newer(target, inputs):
    return not os.path.exists(target) or any(os.path.getmtime(i) > os.path.getmtime(target)
                                             for i in inputs)


def compile_variant_objects(build_temp):
    """Compile every variant's kernels whose object is older than its inputs (two at a time: these
    machines have two cores); returns the object files. A missing compiler stops the build with its
    name. (Not build_ext's --force: torch's BuildExtension sets it always, leaving ninja to decide;
    `make clean` starts afresh.)"""
    cxx = os.environ.get("CXX", "c++")
    headers = csrc(VARIANT_HEADERS)
    jobs = []
    for name, march in cpu_variants():
        flags = VARIANT_FLAGS + ([f"-march={march}"] if march else []) + [
            f"-DRKKD_CPU_VARIANT={variant_token(name)}"]
        for source in csrc(VARIANT_SOURCES):
            obj = os.path.join(build_temp, "cpu_variants", name,
                               os.path.basename(source).replace(".cpp", ".o"))
            jobs.append((obj, [cxx, *flags, "-c", source, "-o", obj], [source, *headers, __file__]))

    def run(job):
        obj, cmd, inputs = job
        if not newer(obj, inputs):
            return None
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        print(" ".join(cmd), flush=True)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except FileNotFoundError:
            return (f"the C++ compiler {cxx!r} was not found: install one (g++ >= 11 or clang >= 12, "
                    f"e.g. `apt install g++`) or set CXX to it")
        if done.returncode != 0:
            return f"{cxx} failed on {cmd[-3]}:\n{done.stderr[-4000:]}"
        return None

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        errors = [e for e in pool.map(run, jobs) if e]
    if errors:
        sys.exit("rkkd-kernels: building the CPU kernels failed: " + errors[0])
    return [obj for obj, _, _ in jobs]


def build_info(torch, cuda_problem, arch_list):
    return {
        "torch_built_against": torch.__version__.split("+")[0],
        "torch_target": ".".join(map(str, TORCH_TARGET)),
        "cpu_variants": [name for name, _ in cpu_variants()],
        "cuda_arch_list": None if cuda_problem else arch_list,
        "cuda_missing": cuda_problem,
    }


def extensions():
    """ext_modules and cmdclass (torch is imported here: a build requirement)."""
    cuda_home = find_cuda_home()
    if cuda_home:  # torch.utils.cpp_extension reads CUDA_HOME when it is imported
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpu = CppExtension(
        f"{PACKAGE}._C", csrc(CPU_LIBRARY_SOURCES), include_dirs=[os.path.join(HERE, CSRC)],
        depends=csrc(CPU_LIBRARY_HEADERS + VARIANT_SOURCES + VARIANT_HEADERS),
        extra_compile_args=["-O3", "-g0", "-fvisibility=hidden", TORCH_TARGET_FLAG],
        py_limited_api=True)
    modules = [cpu]
    cuda_problem = why_no_cuda(torch, cuda_home)
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST
    if cuda_problem is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        nvcc = nvcc_flags()
        cuda = CUDAExtension(
            f"{PACKAGE}._cuda", csrc(CUDA_SOURCES), include_dirs=[os.path.join(HERE, CSRC)],
            depends=csrc(CUDA_HEADERS),
            extra_compile_args={"cxx": ["-O3", "-g0", TORCH_TARGET_FLAG, "-DUSE_CUDA"], "nvcc": nvcc},
            py_limited_api=True)
        # The static CUDA runtime in place of the shared one that CUDAExtension links: the wheel
        # then runs wherever a driver is, whatever CUDA libraries torch brought.
        cuda.libraries = [lib for lib in cuda.libraries if lib != "cudart"] + ["cudart_static", "rt"]
        modules.append(cuda)
        print(f"rkkd-kernels: building the CUDA kernel for TORCH_CUDA_ARCH_LIST={arch_list}")
    else:
        print(f"rkkd-kernels: not building the CUDA kernel: {cuda_problem}")

    class BuildKernels(BuildExtension):
        """Compiles the CPU variants' objects before the CPU library, and records what was built."""

        def build_extension(self, ext):
            if ext is cpu:
                ext.extra_objects = compile_variant_objects(self.build_temp)
            return super().build_extension(ext)

        def run(self):
            super().run()
            out_dir = os.path.dirname(self.get_ext_fullpath(cpu.name))
            if cuda_problem is not None:  # a CUDA library of an earlier build must not ship or load
                for folder in {out_dir, os.path.join(self.build_lib, PACKAGE)}:
                    for stale in glob.glob(os.path.join(folder, "_cuda.*so")):
                        os.remove(stale)
            with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                json.dump(build_info(torch, cuda_problem, arch_list), f, indent=1, sort_keys=True)
                f.write("\n")

    return modules, {"build_ext": BuildKernels}


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tools import its flags
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass,
          options={"bdist_wheel": {"py_limited_api": LIMITED_API}})
