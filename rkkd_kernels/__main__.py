"""``python -m rkkd_kernels``: what this installation has, to paste into a bug report.

Prints the version, Python, torch (CUDA), Triton, the GPUs, the CPU's ISA variants and the one in
use, where the built kernels live, and each backend's availability with the reason where it is
absent. That loads the CPU kernel, building it first if this machine and torch have none yet.

    python -m rkkd_kernels            # the report
    python -m rkkd_kernels --build    # also build the CPU kernel of each variant the tests run
                                      # here, and the CUDA one where a GPU is (or with
                                      # RKKD_BUILD_CUDA=1); exit 1 if a build fails (a Dockerfile,
                                      # the GPU check's first step)
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import List, Optional, Tuple


def _version_of(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as err:  # absent or broken: say which
        return f"not available ({type(err).__name__}: {err})"


def report(build: bool = False) -> Tuple[List[str], List[str]]:
    """The report's lines, and the problems of the builds that were due (for ``--build``)."""
    import torch

    import rkkd_kernels
    from rkkd_kernels import _ext, backends

    lines = [
        f"rkkd_kernels {rkkd_kernels.__version__} ({os.path.dirname(rkkd_kernels.__file__)})",
        f"python {platform.python_version()} ({sys.executable}), {platform.platform()}",
        f"torch {torch.__version__} (git {getattr(torch.version, 'git_version', '?')[:12]}, "
        f"CUDA {torch.version.cuda}), triton {_version_of('triton')}, numpy {_version_of('numpy')}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("GPU: none visible to torch")
    isa, forced_problem = _ext.cpu_isa()
    how = "forced by RKKD_CPU_ISA" if os.environ.get("RKKD_CPU_ISA") else "the best this CPU runs"
    lines.append(f"CPU: {platform.machine()}, {torch.get_num_threads()} threads; runs "
                 f"{', '.join(_ext.supported_isas())}; kernel variant in use: {isa} ({how})")

    due = []
    if build:
        due += [_ext.cpu_extension(isa).load() for isa in _ext.tested_cpu_isas()]
        if _ext.why_not_build_cuda(gpu_present=torch.cuda.is_available()) is None:
            due.append(_ext.cuda_extension().load())
    available = backends.available_backends()  # loads (builds) the CPU kernel
    due.append(available["cpu"])

    cpu = _ext.cpu_extension()
    lines.append(f"built kernels: {_ext.cache_dir()} (RKKD_CACHE_DIR sets it)")
    info = _ext.read_prebuilt_info()
    if info is None:
        lines.append("ahead-of-time kernels: none (built on first use)")
    else:
        mismatch = _ext.prebuilt_mismatch(info)
        lines.append(f"ahead-of-time kernels: {_ext.PREBUILT_DIR} for torch {info.get('torch')}"
                     + (f": not used, {mismatch}" if mismatch else ""))
    for name, ext in (("cpu", cpu), ("cuda", _ext.cuda_extension())):
        if ext.path:
            lines.append(f"{name} kernel loaded from {ext.path} ({ext.origin})")
    lines.append("backends:")
    for name, reason in available.items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return lines, [p for p in due if p]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rkkd_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true",
                        help="also build the CUDA kernel where a GPU is (or RKKD_BUILD_CUDA=1), and "
                             "exit 1 if a build fails")
    args = parser.parse_args(argv)
    lines, problems = report(build=args.build)
    print("\n".join(lines))
    if args.build and problems:
        print("\nbuild failed:\n" + "\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
