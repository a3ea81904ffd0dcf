"""``python -m rkkd_kernels``: what this installation has, to paste into a bug report.

Prints the version, Python, torch (CUDA), Triton, the GPUs, the torch the compiled kernels were built
against and the one they target, the CPU variants compiled in and the one in use, the CUDA
architectures in the package, and each backend's availability with the reason where it is absent.
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _version_of(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as err:  # absent or broken: say which
        return f"not available ({type(err).__name__}: {err})"


def report() -> List[str]:
    """The report's lines."""
    import torch

    import rkkd_kernels
    from rkkd_kernels import _ext, backends

    info = _ext.build_info()
    lines = [
        f"rkkd_kernels {rkkd_kernels.__version__} ({_ext.HERE})",
        f"python {platform.python_version()} ({sys.executable}), {platform.platform()}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {_version_of('triton')}",
        f"compiled kernels: built against torch {info.get('torch_built_against', '?')}, "
        f"target torch >= {info.get('torch_target', '?')} (LibTorch stable ABI)",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("GPU: none visible to torch")
    if _ext.cpu_problem() is None:
        lines.append(f"CPU: {platform.machine()}, {torch.get_num_threads()} threads; variants compiled "
                     f"in: {', '.join(_ext.cpu_variants_compiled())}; this CPU runs: "
                     f"{', '.join(_ext.cpu_variants())}; in use: {_ext.cpu_variant_in_use()}")
    archs = info.get("cuda_arch_list")
    lines.append(f"CUDA kernel: architectures {archs}" if archs else
                 f"CUDA kernel: not in this installation ({info.get('cuda_missing', 'not built')})")
    lines.append("backends:")
    for name, reason in backends.available_backends().items():
        lines.append(f"  {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rkkd_kernels", description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
