"""Builds and loads the compiled kernels (csrc/) for the machine and the torch at hand.

The wheel is pure Python. A compiled library is made on first use with
``torch.utils.cpp_extension.load`` (ninja), once per machine and torch, into a cache folder, or ahead
of time by ``RKKD_BUILD_EXT=1 pip install --no-build-isolation .`` (setup.py, which uses this module's
rules without importing torch unless it builds).

- The CPU library is built per ISA variant: ``-march=x86-64-v4`` (AVX-512), ``x86-64-v3`` (AVX2+FMA,
  the baseline of ahead-of-time builds), ... never ``-march=native``, so that the variant's name, which
  is part of the cache key, says exactly which instructions the binary may use. The best variant this
  CPU runs is chosen; ``RKKD_CPU_ISA`` forces one. Each variant registers its op under its own name
  (``rkkd::_kendall_cpu_x86_64_v4``, see csrc/op_name.h), so several may be loaded in one process.
- The CUDA library (``rkkd::_kendall_cuda``) is built where it can run: on first use of
  ``backend="cuda"``, or when asked (``RKKD_BUILD_CUDA=1``); see :func:`why_not_build_cuda`.
- ``rkkd::kendall``'s CPU and CUDA kernels are Python functions (backends.py) that load the library
  and call its op, so the build starts inside the op, where ``torch.compile`` never traces.

Cache key: torch's version (and git hash, CUDA version), the Python ABI, the machine, the ISA
variant, the flags and the hash of every source file. Folder: ``$RKKD_CACHE_DIR``, else
``$XDG_CACHE_HOME/rkkd_kernels``, else ``~/.cache/rkkd_kernels``. A file lock makes concurrent
processes (DDP ranks) build once; a failed build is tried once per process, and its reason (the key
lines of the log and the fix) is what ``backend="cpu"`` raises and ``available_backends()`` reports.

This module imports torch only inside functions: setup.py loads it in a build environment that may
have no torch.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

try:
    import fcntl
except ImportError:  # not POSIX: torch's own lock in the build folder still serialises builds
    fcntl = None

HERE = os.path.dirname(os.path.abspath(__file__))
# Ahead-of-time binaries (setup.py with RKKD_BUILD_EXT=1) and the record of what they were built for.
PREBUILT_DIR = os.path.join(HERE, "_prebuilt")
PREBUILT_INFO = "build_info.json"

# The sources of each library, in csrc/. A new .cpp of the CPU library goes into CPU_SOURCES, a new
# .cu of the CUDA one into CUDA_SOURCES; every csrc file is part of the cache key anyway.
CPU_SOURCES = ("kendall_cpu.cpp", "kendall_expsum_cpu.cpp")
CUDA_SOURCES = ("kendall_cuda.cu",)

# Flags of the CPU library besides -march. No -ffast-math: the kernels rely on IEEE semantics
# (NaN rows, exact signs); -fno-math-errno only lets std::exp and friends vectorise.
# -fvisibility=hidden keeps each variant's inline and template functions its own.
CPU_CFLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fvisibility=hidden")
CPU_LDFLAGS = ("-fopenmp",)
# No --use_fast_math: it would flush subnormals (a hard teacher's sign of a tiny difference) and
# coarsen exp; the kernel asks for its fast reciprocal explicitly (pair_math.h).
CUDA_NVCC_FLAGS = ("-O3", "-lineinfo")
CUDA_CXX_FLAGS = ("-O3",)
# Where no GPU says which architecture to build for: A100 and H100/H200 code, plus PTX.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def source_dir() -> str:
    """csrc/: inside the package when installed (package data), beside it in a clone."""
    inside = os.path.join(HERE, "csrc")
    return inside if os.path.isdir(inside) else os.path.join(os.path.dirname(HERE), "csrc")


def sources_hash(root: Optional[str] = None) -> Optional[str]:
    """sha256 of every file in csrc/ (names and contents); None when the sources are absent."""
    root = root or source_dir()
    files = sorted(glob.glob(os.path.join(root, "*.h")) + glob.glob(os.path.join(root, "*.cpp"))
                   + glob.glob(os.path.join(root, "*.cu")) + glob.glob(os.path.join(root, "*.cuh")))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# CPU ISA variants.

# The x86-64 micro-architecture levels (GCC >= 11 and Clang >= 12 know them as -march values), best
# first, with the /proc/cpuinfo flags each adds to the one below it.
X86_LEVELS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("x86-64-v4", ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")),
    ("x86-64-v3", ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave")),
    ("x86-64-v2", ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3")),
    ("x86-64", ()),
)
# The variants that ahead-of-time builds carry: the baseline and the faster one.
PREBUILT_CPU_ISAS = ("x86-64-v3", "x86-64-v4")
# Other machines (aarch64, ...) get one variant: the compiler's default target, no -march.
GENERIC_ISA = "generic"


IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def is_x86() -> bool:
    return IS_X86


def known_isas() -> Tuple[str, ...]:
    return tuple(name for name, _ in X86_LEVELS) if is_x86() else (GENERIC_ISA,)


_CPU_FLAGS: Optional[frozenset] = None


def cpu_flags() -> frozenset:
    """The CPU's feature flags (Linux /proc/cpuinfo), read once; empty where unknown."""
    global _CPU_FLAGS
    if _CPU_FLAGS is None:
        flags: frozenset = frozenset()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = frozenset(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        _CPU_FLAGS = flags
    return _CPU_FLAGS


def supported_isas(flags: Optional[frozenset] = None) -> List[str]:
    """The variants this CPU runs, best first (the generic one only, off x86)."""
    if not is_x86():
        return [GENERIC_ISA]
    flags = cpu_flags() if flags is None else flags
    return [name for name, _ in X86_LEVELS if needed_flags(name) <= flags]


def needed_flags(isa: str) -> frozenset:
    """The CPU flags that an x86 variant needs: its level's and every lower level's.

    (Written so that torch.compile, which traces the backend choice, can follow it on torch 2.6.)"""
    levels = [name for name, _ in X86_LEVELS]
    return frozenset(flag for _, flags in X86_LEVELS[levels.index(isa):] for flag in flags)


def missing_flags(isa: str, flags: Optional[frozenset] = None) -> List[str]:
    flags = cpu_flags() if flags is None else flags
    return sorted(needed_flags(isa) - flags)


def cpu_isa() -> Tuple[str, Optional[str]]:
    """(the variant to use, None) or (the forced variant, why it cannot run here).

    ``RKKD_CPU_ISA`` forces a variant; by default the best one this CPU runs."""
    forced = os.environ.get("RKKD_CPU_ISA")
    if not forced:
        return supported_isas()[0], None
    if forced not in known_isas():
        return forced, (f"RKKD_CPU_ISA={forced!r} is not a CPU variant of this machine; "
                        f"expected one of {', '.join(known_isas())}")
    if forced not in supported_isas():
        return forced, (f"RKKD_CPU_ISA={forced} needs CPU features that this CPU lacks "
                        f"({', '.join(missing_flags(forced))}); it runs {', '.join(supported_isas())}")
    return forced, None


def tested_cpu_isas() -> List[str]:
    """The variants the test suite runs here: each ahead-of-time variant this CPU supports, and the
    best one it runs (they coincide on most machines)."""
    supported = supported_isas()
    return [supported[0]] + [i for i in PREBUILT_CPU_ISAS if i in supported and i != supported[0]]


def isa_token(isa: str) -> str:
    """The variant as a C identifier (op names, -DRKKD_ISA): x86-64-v4 -> x86_64_v4."""
    return re.sub(r"\W", "_", isa)


def cpu_op_name(op: str, isa: str) -> str:
    """The name under which the CPU library of ``isa`` registers ``op`` (csrc/op_name.h)."""
    return f"_{op}_cpu_{isa_token(isa)}"


def cuda_op_name(op: str) -> str:
    return f"_{op}_cuda"


def cpu_cflags(isa: str) -> List[str]:
    march = [] if isa == GENERIC_ISA else [f"-march={isa}"]
    return list(CPU_CFLAGS) + march + [f"-DRKKD_ISA={isa_token(isa)}"]


# ------------------------------------------------------------------------------------------------
# CUDA: where the toolkit is, and the one rule for whether to build the CUDA library here.


def _is_toolkit(root: Optional[str]) -> bool:
    """A CUDA toolkit root: nvcc and the runtime headers that torch's build adds to the paths."""
    return bool(root) and all(
        os.path.exists(os.path.join(root, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


def _toolkit_behind(nvcc: str) -> Optional[str]:
    """The toolkit an nvcc on PATH belongs to; a wrapper script (``exec /opt/cuda/bin/nvcc``) is
    seen through by asking nvcc where it runs from (its --dryrun prints ``_HERE_=<bin dir>``)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(root):
        return root
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if match:
        root = os.path.dirname(os.path.realpath(match.group(1).strip()))
        if _is_toolkit(root):
            return root
    return None


def find_cuda_home() -> Optional[str]:
    """CUDA_HOME, else the toolkit of the nvcc on PATH, else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    root = _toolkit_behind(nvcc) if nvcc else None
    if root:
        return root
    return "/usr/local/cuda" if _is_toolkit("/usr/local/cuda") else None


def _nvcc_release(nvcc: str) -> Optional[Tuple[int, int]]:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


_TOOLCHAIN: Dict[str, Optional[str]] = {}


def cuda_toolchain_problem() -> Optional[str]:
    """None when the CUDA library can be compiled here (a CUDA torch and an nvcc of its major
    version), else why not. Runs nvcc once per process."""
    if "problem" not in _TOOLCHAIN:
        import torch

        home = find_cuda_home()
        nvcc = os.path.join(home, "bin", "nvcc") if home else None
        if torch.version.cuda is None:
            problem = f"torch {torch.__version__} is a CPU-only build"
        elif nvcc is None or not os.path.exists(nvcc):
            problem = "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
        else:
            release = _nvcc_release(nvcc)
            torch_major = int(torch.version.cuda.split(".")[0])
            if release is None:
                problem = f"{nvcc} --version does not say its release"
            elif release[0] != torch_major:  # torch refuses to build across CUDA major versions
                problem = (f"nvcc {release[0]}.{release[1]} ({nvcc}) cannot build for torch's CUDA "
                           f"{torch.version.cuda}; install a CUDA {torch_major}.x toolkit")
            else:
                problem = None
        _TOOLCHAIN["problem"], _TOOLCHAIN["home"] = problem, home
    return _TOOLCHAIN["problem"]


def why_not_build_cuda(gpu_present: bool, asked: bool = False) -> Optional[str]:
    """The rule, for setup.py, the first-use build and the build test alike: None when the CUDA
    library should be built here, else why not.

    Built where a GPU is present or when asked (``RKKD_BUILD_CUDA=1``, or ``asked=True``), and only
    with a toolchain that can build it; ``RKKD_BUILD_CUDA=0`` never builds it. So a machine without
    a GPU compiles no CUDA unless asked."""
    flag = os.environ.get("RKKD_BUILD_CUDA")
    if flag == "0":
        return "RKKD_BUILD_CUDA=0"
    if not (gpu_present or asked or flag == "1"):
        return "no CUDA device here (RKKD_BUILD_CUDA=1 builds the CUDA kernel anyway)"
    return cuda_toolchain_problem()


def nvidia_include_dirs() -> List[str]:
    """The CUDA headers that pip's nvidia packages ship (cu13 keeps them in nvidia/cu13/include)."""
    dirs: List[str] = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "cu*", "include"))
    return sorted(set(dirs))


def cuda_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' architectures, else the default list."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    import torch

    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{major}.{minor}" for major, minor in caps)
    return DEFAULT_CUDA_ARCH_LIST


def cuda_nvcc_flags() -> List[str]:
    # pip's nvidia headers come after the toolkit's own (-isystem is searched after every -I), so
    # they only fill in what a slim toolkit lacks.
    flags = list(CUDA_NVCC_FLAGS)
    for d in nvidia_include_dirs():
        flags += ["-isystem", d]
    return flags


# ------------------------------------------------------------------------------------------------
# Cache and locking.


def cache_dir() -> str:
    if os.environ.get("RKKD_CACHE_DIR"):
        return os.path.abspath(os.environ["RKKD_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rkkd_kernels")


def torch_identity() -> Dict[str, Optional[str]]:
    """What a binary built against this torch and Python depends on (torch has no stable C++ ABI)."""
    import torch

    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "torch_cuda": torch.version.cuda,
        "python": sys.implementation.cache_tag,
        "soabi": sysconfig.get_config_var("SOABI"),
        "machine": platform.machine(),
    }


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock (released by the kernel if the holder dies)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# Lines of a failed build's log that say what went wrong (compiler diagnostics, ninja's summary).
_KEY_LINE = re.compile(r"error|FAILED|fatal|not found|No such file|undefined reference|"
                       r"unrecognized|bad value|non-zero exit status|Ninja is required|"
                       r"ninja: build stopped", re.IGNORECASE)


def key_lines(log: str, limit: int = 8, width: int = 240) -> List[str]:
    """The lines of a build log worth quoting in an error, each cut to ``width`` characters; a
    command that failed without a word (ninja's FAILED: then the command) is quoted too."""
    lines = log.splitlines()
    picked: List[str] = []
    for i, line in enumerate(lines):
        if _KEY_LINE.search(line):
            picked.append(line)
            if line.startswith("FAILED") and i + 1 < len(lines):
                picked.append(lines[i + 1])
    picked = list(dict.fromkeys(l.strip() for l in picked if l.strip()))[:limit] or [
        l.strip() for l in lines[-limit:] if l.strip()]
    return [l if len(l) <= width else l[: width - 3] + "..." for l in picked]


def _fix_for(log: str, kind: str) -> str:
    if "Ninja is required" in log:
        return "install ninja (`pip install ninja`)"
    if kind == "cuda":
        return ("install a CUDA toolkit of torch's CUDA major version (or set CUDA_HOME to one), or "
                "use backend='triton'")
    compiler = os.environ.get("CXX", "c++")
    if re.search(r"\berror:", log):  # the compiler ran and rejected something
        return (f"the compiler ({compiler}) rejected the code: use g++ >= 11 or clang >= 12 with "
                "OpenMP (set CXX to it), or report the log's first error; then restart Python")
    return (f"install a C++ compiler with OpenMP that knows -march=x86-64-v3 (g++ >= 11 or "
            f"clang >= 12, e.g. `apt install g++`) or point CXX at one (tried: {compiler}); then "
            "restart Python")


# ------------------------------------------------------------------------------------------------
# One compiled library.


class Extension:
    """One compiled library: the CPU kernels of one ISA variant, or the CUDA kernels.

    ``load()`` makes it available in this process: the ahead-of-time binary when it was built for
    this torch, else the cached build, else a build now (under the lock). It is tried once per
    process: a failure is kept in ``problem`` and returned again without a new build.
    """

    def __init__(self, kind: str, isa: Optional[str] = None) -> None:
        self.kind = kind  # "cpu" or "cuda"
        self.isa = isa
        self.problem: Optional[str] = None  # why it is unavailable in this process, once known
        self.path: Optional[str] = None  # the loaded library
        self.origin: Optional[str] = None  # "ahead of time", "cache" or "built now"
        self.attempts = 0  # builds started in this process (at most one)
        self._lock = threading.Lock()
        self._ops: Dict[str, Callable] = {}

    # -- what is built, and under which key

    @property
    def label(self) -> str:
        return f"the CPU kernel ({self.isa})" if self.kind == "cpu" else "the CUDA kernel"

    def sources(self) -> List[str]:
        names = CPU_SOURCES if self.kind == "cpu" else CUDA_SOURCES
        return [os.path.join(source_dir(), n) for n in names]

    def build_args(self) -> Dict[str, object]:
        if self.kind == "cpu":
            return {"cflags": cpu_cflags(self.isa), "ldflags": list(CPU_LDFLAGS)}
        return {"cflags": list(CUDA_CXX_FLAGS), "cuda_cflags": cuda_nvcc_flags(),
                "arch_list": cuda_arch_list()}

    def key(self) -> Dict[str, object]:
        ident = torch_identity()
        if self.kind == "cpu":
            ident.pop("torch_cuda")  # the CPU library does not depend on torch's CUDA
        return {"kind": self.kind, "isa": self.isa, **ident, **self.build_args(),
                "sources": sources_hash()}

    def build_name(self) -> str:
        """Library and folder name: readable part (kind, variant) + a hash of the whole key."""
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]
        what = f"cpu_{isa_token(self.isa)}" if self.kind == "cpu" else "cuda"
        return f"rkkd_{what}_{digest}"

    def build_dir(self) -> str:
        return os.path.join(cache_dir(), self.build_name())

    def op_name(self, op: str) -> str:
        return cpu_op_name(op, self.isa) if self.kind == "cpu" else cuda_op_name(op)

    # -- making it available

    def precheck(self, asked: bool = False) -> Optional[str]:
        """Why it cannot even be tried here (no build), or None."""
        if self.kind == "cpu":
            if self.isa not in known_isas():
                return f"{self.isa!r} is not a CPU variant of this machine ({', '.join(known_isas())})"
            if self.isa not in supported_isas():
                return (f"this CPU cannot run the {self.isa} variant (it lacks "
                        f"{', '.join(missing_flags(self.isa))})")
        else:
            import torch

            reason = why_not_build_cuda(gpu_present=torch.cuda.is_available(), asked=asked)
            if reason is not None:
                return reason
        if sources_hash() is None and self._prebuilt_path()[0] is None:
            return f"the C++ sources are missing ({source_dir()}); reinstall rkkd-kernels"
        return None

    def check(self) -> Optional[str]:
        """Find out, without building, what :meth:`precheck` says; kept like a build's failure."""
        with self._lock:
            if self.path is None and self.problem is None:
                self.problem = self.precheck()
        return self.problem

    def load(self, asked: bool = False) -> Optional[str]:
        """Make the library available; None on success, else why not (kept for this process).

        ``asked``: build the CUDA library even without a GPU (the build test)."""
        if self.path is not None or self.problem is not None:
            return self.problem
        with self._lock:
            if self.path is None and self.problem is None:
                self.problem = self.precheck(asked) or self._load()
        return self.problem

    def op(self, op: str) -> Callable:
        """The compiled op (``torch.ops.rkkd.<name>.default``); raises RuntimeError when the
        library is unavailable, with the reason and the fix."""
        fn = self._ops.get(op)
        if fn is None:
            problem = self.load()
            if problem is not None:
                backend = "cpu" if self.kind == "cpu" else "cuda"
                raise RuntimeError(f"backend {backend!r} is not available: {problem}")
            import torch

            fn = self._ops[op] = getattr(torch.ops.rkkd, self.op_name(op)).default
        return fn

    def _load(self) -> Optional[str]:
        path, _ = self._prebuilt_path()
        if path is not None:
            try:
                self._load_library(path)
                self.path, self.origin = path, "ahead of time"
                return None
            except OSError as err:  # e.g. a library it needs is missing here: build instead
                print(f"rkkd_kernels: {path} does not load ({err}); building on first use instead",
                      file=sys.stderr)
        build_dir = self.build_dir()
        so = os.path.join(build_dir, self.build_name() + ".so")
        marker = os.path.join(build_dir, "build.json")
        try:
            with file_lock(build_dir + ".lock"):
                origin = "cache"
                if os.path.exists(marker) and os.path.exists(so):
                    try:
                        self._load_library(so)
                    except OSError:  # a damaged cache entry: build it again
                        os.remove(marker)
                if not os.path.exists(marker):
                    problem = self._build(build_dir, marker)
                    if problem is not None:
                        return problem
                    origin = "built now"
        except OSError as err:  # the cache folder cannot be written
            return (f"{self.label} cannot be built into {build_dir} ({err}); set RKKD_CACHE_DIR to "
                    "a writable folder")
        self.path, self.origin = so, origin
        return None

    def _build(self, build_dir: str, marker: str) -> Optional[str]:
        """Compile and load under the lock; on failure, the log's key lines and the fix."""
        self.attempts += 1
        os.makedirs(build_dir, exist_ok=True)
        # Under our lock nobody else builds here, so a lock file that torch's older versions
        # leave behind when a builder dies can only be stale.
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(build_dir, "lock"))
        print(f"rkkd_kernels: building {self.label} for torch {torch_identity()['torch']} in "
              f"{build_dir} (once per machine and torch; about a minute)", file=sys.stderr)
        start = time.perf_counter()
        try:
            self._compile_and_load(build_dir)
        except Exception as err:  # a missing compiler, a compile error, ninja missing, ...
            log = f"{type(err).__name__}: {err}"
            log_path = os.path.join(build_dir, "build.log")
            with open(log_path, "w") as f:
                f.write(log + "\n")
            quoted = "\n    ".join(key_lines(log))
            return (f"{self.label} failed to build (full log: {log_path}):\n    {quoted}\n"
                    f"  fix: {_fix_for(log, self.kind)}")
        seconds = time.perf_counter() - start
        with open(marker, "w") as f:
            json.dump({**self.key(), "build_seconds": round(seconds, 1)}, f, indent=1, sort_keys=True)
        print(f"rkkd_kernels: built {self.label} in {seconds:.0f} s", file=sys.stderr)
        return None

    def _compile_and_load(self, build_dir: str) -> None:
        import torch.utils.cpp_extension as cpp

        args = self.build_args()
        if self.kind == "cpu":
            cpp.load(self.build_name(), self.sources(), extra_cflags=args["cflags"],
                     extra_ldflags=args["ldflags"], extra_include_paths=[source_dir()],
                     build_directory=build_dir, with_cuda=False, is_python_module=False)
            return
        cpp.CUDA_HOME = _TOOLCHAIN.get("home") or cpp.CUDA_HOME  # read when cpp_extension loads
        saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = args["arch_list"]
        try:
            cpp.load(self.build_name(), self.sources(), extra_cflags=args["cflags"],
                     extra_cuda_cflags=args["cuda_cflags"], extra_include_paths=[source_dir()],
                     build_directory=build_dir, with_cuda=True, is_python_module=False)
        finally:
            if saved is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST")
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved

    def _load_library(self, path: str) -> None:
        import torch

        torch.ops.load_library(path)

    # -- ahead-of-time binaries

    def _prebuilt_path(self) -> Tuple[Optional[str], Optional[str]]:
        """(the ahead-of-time binary to load, None), or (None, why there is none to use)."""
        info = read_prebuilt_info()
        if info is None:
            return None, None
        mismatch = prebuilt_mismatch(info)
        if mismatch is not None:
            return None, mismatch
        name = info["cpu"].get(self.isa) if self.kind == "cpu" else info.get("cuda")
        if not name or not os.path.exists(os.path.join(PREBUILT_DIR, name)):
            return None, f"no ahead-of-time binary of {self.label}"
        return os.path.join(PREBUILT_DIR, name), None


def read_prebuilt_info() -> Optional[dict]:
    try:
        with open(os.path.join(PREBUILT_DIR, PREBUILT_INFO)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def prebuilt_mismatch(info: dict) -> Optional[str]:
    """Why ahead-of-time binaries recorded by ``info`` must not be loaded here, or None."""
    here = torch_identity()
    for field in ("torch", "torch_git", "python", "soabi", "machine"):
        if info.get(field) != here[field]:
            return (f"the ahead-of-time binaries were built for {field} {info.get(field)}, this is "
                    f"{here[field]}; building on first use instead")
    current = sources_hash()
    if current is not None and info.get("sources") != current:
        return "the ahead-of-time binaries are older than the sources; building on first use instead"
    return None


_CPU: Dict[str, Extension] = {}
_CUDA: List[Extension] = []


def cpu_extension(isa: Optional[str] = None) -> Extension:
    """The CPU library of ``isa`` (default: the variant in use, :func:`cpu_isa`)."""
    isa = isa or cpu_isa()[0]
    if isa not in _CPU:
        _CPU[isa] = Extension("cpu", isa)
    return _CPU[isa]


def cuda_extension() -> Extension:
    if not _CUDA:
        _CUDA.append(Extension("cuda"))
    return _CUDA[0]


def cpu_problem() -> Optional[str]:
    """What is known, without building, against the CPU library in use: a bad RKKD_CPU_ISA or a
    failed build in this process. Cheap (torch.compile traces the caller)."""
    isa, problem = cpu_isa()
    ext = _CPU.get(isa)
    return problem or (ext.problem if ext is not None else None)


def cuda_problem() -> Optional[str]:
    """What is known, without building, against the CUDA library (a failed build or toolchain)."""
    return _CUDA[0].problem if _CUDA else None


def cpu_kernel(op: str) -> Callable:
    """A CPU kernel for ``rkkd::<op>``: the compiled op of the variant in use, loaded (or built)
    at its first call. After that a call costs a dict lookup (RKKD_CPU_ISA may change per call:
    the tests run each variant)."""
    ready: Dict[Optional[str], Callable] = {}  # RKKD_CPU_ISA's value -> the loaded op

    def kernel(*args):
        forced = os.environ.get("RKKD_CPU_ISA")
        fn = ready.get(forced)
        if fn is None:
            isa, problem = cpu_isa()
            if problem is not None:
                raise RuntimeError(f"backend 'cpu' is not available: {problem}")
            fn = ready[forced] = cpu_extension(isa).op(op)
        return fn(*args)

    kernel.__name__ = f"{op}_cpu"
    return kernel


def cuda_kernel(op: str) -> Callable:
    """A CUDA kernel for ``rkkd::<op>``: the compiled op, built at its first call."""

    def kernel(*args):
        return cuda_extension().op(op)(*args)

    kernel.__name__ = f"{op}_cuda"
    return kernel
