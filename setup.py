"""setup.py of rkkd-kernels (metadata in pyproject.toml).

By default this builds a pure-Python package: the C++ and CUDA kernels (csrc/, shipped as package
data) are compiled on first use for the machine and torch at hand (rkkd_kernels/_ext.py), so the
build environment needs no torch, and the package works with whatever torch it meets.

``RKKD_BUILD_EXT=1`` builds them ahead of time instead, against the torch of the build environment
(so with ``pip install --no-build-isolation``):

- the CPU kernel once per ISA variant: the x86-64-v3 (AVX2+FMA) baseline and x86-64-v4 (AVX-512);
  the package picks the best one that the CPU runs;
- the CUDA kernel where the rule of ``_ext.why_not_build_cuda`` says so: a GPU is present or
  ``RKKD_BUILD_CUDA=1``, and nvcc can build for torch's CUDA (``TORCH_CUDA_ARCH_LIST``, default
  the GPUs' own, else "8.0;9.0+PTX"). A failed CUDA build never stops the CPU one.

The binaries record the torch they were built for (``rkkd_kernels/_prebuilt/build_info.json``); under
another torch they are left alone and the kernels are built on first use.
"""

import importlib.util
import json
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_rules():
    """rkkd_kernels/_ext.py, without importing the package (whose __init__ imports torch)."""
    spec = importlib.util.spec_from_file_location("_rkkd_ext", os.path.join(HERE, "rkkd_kernels", "_ext.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ahead_of_time_build():
    """ext_modules and cmdclass for RKKD_BUILD_EXT=1."""
    ext = _load_rules()
    home = ext.find_cuda_home()
    if home:  # torch.utils.cpp_extension reads CUDA_HOME when it is imported
        os.environ["CUDA_HOME"] = home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        sys.exit(f"RKKD_BUILD_EXT=1 builds against the torch of the build environment, which has "
                 f"none ({err}): use `pip install --no-build-isolation .` in an environment with torch")

    csrc = os.path.relpath(ext.source_dir(), HERE)
    isas = ext.PREBUILT_CPU_ISAS if ext.is_x86() else (ext.GENERIC_ISA,)
    modules = [
        CppExtension(
            f"rkkd_kernels._prebuilt.{_cpu_name(ext, isa)}",
            [os.path.join(csrc, s) for s in ext.CPU_SOURCES],
            include_dirs=[ext.source_dir()],
            extra_compile_args=ext.cpu_cflags(isa),
            extra_link_args=list(ext.CPU_LDFLAGS),
        )
        for isa in isas
    ]
    why_no_cuda = ext.why_not_build_cuda(gpu_present=torch.cuda.is_available())
    if why_no_cuda is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ext.cuda_arch_list()
        modules.append(
            CUDAExtension(
                "rkkd_kernels._prebuilt.rkkd_cuda",
                [os.path.join(csrc, s) for s in ext.CUDA_SOURCES],
                include_dirs=[ext.source_dir()],
                extra_compile_args={"cxx": list(ext.CUDA_CXX_FLAGS), "nvcc": ext.cuda_nvcc_flags()},
                optional=True,  # setuptools then skips copying it when it was not built
            )
        )
        print(f"rkkd_kernels: building the CUDA kernel for TORCH_CUDA_ARCH_LIST="
              f"{os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    else:
        print(f"rkkd_kernels: not building the CUDA kernel: {why_no_cuda}", file=sys.stderr)

    class BuildKernels(BuildExtension):
        """Builds each kernel on its own (a CUDA failure leaves the CPU ones), then records what
        they were built for in _prebuilt/build_info.json."""

        def build_extension(self, e):
            # Every variant compiles the same sources with other flags: separate object folders.
            self.build_temp = os.path.join(self._temp_root, e.name.rsplit(".", 1)[-1])
            if not e.name.endswith(".rkkd_cuda"):
                return super().build_extension(e)
            try:
                return super().build_extension(e)
            except Exception as err:  # report and go on: the CPU kernels must still install
                print(f"rkkd_kernels: the CUDA kernel failed to build, so it is built on first use "
                      f"instead: {err}", file=sys.stderr)
                self._failed.add(e.name)
                return None

        def run(self):
            self._temp_root, self._failed = self.build_temp, set()
            super().run()
            built = {e.name: os.path.basename(self.get_ext_fullpath(e.name))
                     for e in self.extensions if e.name not in self._failed}
            info = {
                **ext.torch_identity(),
                "sources": ext.sources_hash(),
                "cpu": {isa: built[f"rkkd_kernels._prebuilt.{_cpu_name(ext, isa)}"] for isa in isas},
                "cuda": built.get("rkkd_kernels._prebuilt.rkkd_cuda"),
            }
            out_dir = os.path.dirname(self.get_ext_fullpath(self.extensions[0].name))
            with open(os.path.join(out_dir, ext.PREBUILT_INFO), "w") as f:
                json.dump(info, f, indent=1, sort_keys=True)

    return modules, {"build_ext": BuildKernels.with_options(use_ninja=True)}


def _cpu_name(ext, isa):
    return f"rkkd_cpu_{ext.isa_token(isa)}"


if os.environ.get("RKKD_BUILD_EXT") == "1":
    ext_modules, cmdclass = _ahead_of_time_build()
else:
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
