"""One measurement: the inputs, a provider's loss, its run time and its peak extra memory.

These functions run inside a worker child process (``benchmarks/worker.py``), never in the process
that draws the plots, so that the resident-set figures only see the loss itself.

Providers:
    reference            ``kendall_loss(..., backend="reference")`` run eagerly (materializes C x C)
    reference_compiled   the same function under ``torch.compile(fullgraph=True, dynamic=False)``
    cpu, triton, cuda    the fused backends

Modes (the student requires grad and the teacher is detached, as in distillation):
    forward              the training forward: the loss, with its autograd graph
    backward             the gradient of a loss whose forward ran just before, untimed (a graph
                         cannot be run backward twice: the compiled one donates its buffers)
    forward+backward     both, as one training step of the loss
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from rkkd_kernels import kendall_loss

STEEPNESS = 1.0  # k of the loss in every benchmark
MODES = ("forward", "backward", "forward+backward")
REFERENCE_PROVIDERS = ("reference", "reference_compiled")
DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Calls at least this slow are timed one by one. Below it, blocks of back-to-back calls: a lone call
# on a busy machine also pays for waking the thread pool (several ms when other processes hold the
# cores), which says nothing about the kernel.
SLOW_CALL_S = 0.1


@dataclass(frozen=True)
class Spec:
    """What to measure: one provider on one input shape, for some modes."""

    provider: str
    device: str
    dtype: str
    batch: int
    classes: int
    top_k: Optional[int]
    modes: Sequence[str]
    min_run_time_s: float = 0.25
    min_reps: int = 3
    seed: int = 0


# ----------------------------------------------------------------------------------- inputs, loss
def make_inputs(batch: int, classes: int, dtype: str, device: str, seed: int):
    """Standard normal logits (the same for every provider): a student that requires grad and a
    detached teacher."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator)
    teacher = torch.randn(batch, classes, generator=generator)
    student = student.to(device=device, dtype=DTYPES[dtype]).requires_grad_()
    teacher = teacher.to(device=device, dtype=DTYPES[dtype])
    return student, teacher


def loss_function(provider: str, top_k: Optional[int]) -> LossFn:
    """The provider's loss, always called through the public ``kendall_loss``."""
    backend = "reference" if provider in REFERENCE_PROVIDERS else provider

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return kendall_loss(student, teacher, STEEPNESS, top_k=top_k, backend=backend)

    if provider == "reference_compiled":
        # A fresh compilation per shape: static shapes give Inductor its best case, and the compile
        # time of each cell is then its own.
        torch._dynamo.reset()
        return torch.compile(loss, fullgraph=True, dynamic=False)
    return loss


def mode_callable(mode: str, loss_fn: LossFn, student: torch.Tensor, teacher: torch.Tensor):
    """A no-argument function that runs "forward" or "forward+backward" once."""
    if mode == "forward":
        return lambda: loss_fn(student, teacher)
    if mode == "forward+backward":
        return lambda: torch.autograd.grad(loss_fn(student, teacher), student)
    raise ValueError(f"mode_callable runs forward or forward+backward, not {mode!r}")


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    median_ms: float
    iqr_ms: float
    min_ms: float
    samples: int


def timing_of(samples_s: Sequence[float]) -> Timing:
    samples = torch.tensor(list(samples_s), dtype=torch.float64) * 1e3
    q25, q50, q75 = torch.quantile(samples, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    return Timing(float(q50), float(q75 - q25), float(samples.min()), len(samples))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wall_seconds(fn: Callable[[], Any], device: str) -> float:
    """Wall time of one call, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_cpu(fn: Callable[[], Any], min_run_time_s: float) -> Timing:
    """torch.utils.benchmark on all of torch's threads (its Timer defaults to one thread).

    ``blocked_autorange`` sizes blocks of calls so that the timer's overhead is negligible and runs
    blocks until ``min_run_time`` has passed; each sample is the mean call time of one block.
    """
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time_s)
    return timing_of([t for t in measurement.times])


def time_cuda(fn: Callable[[], Any], min_run_time_s: float) -> Timing:
    """triton.testing.do_bench: CUDA events around each call, the L2 cache flushed in between, calls
    for about ``min_run_time_s`` after a warm-up."""
    from triton.testing import do_bench

    times_ms = do_bench(fn, rep=min_run_time_s * 1e3, return_mode="all")
    return timing_of([t / 1e3 for t in times_ms])


def time_calls(fn: Callable[[], Any], device: str, once_s: float, min_run_time_s: float,
               min_reps: int) -> Timing:
    """Blocks of calls for fast functions; single calls, ``min_reps`` or more, for slow ones. A fast
    call (below ``min_run_time_s / min_reps``) on a GPU gets as many samples as fit in
    ``min_run_time_s``, about ``min_reps`` or more: do_bench sizes them from its own estimate."""
    if once_s >= max(SLOW_CALL_S, min_run_time_s / min_reps):
        reps = max(min_reps, math.ceil(min_run_time_s / once_s))
        return timing_of([wall_seconds(fn, device) for _ in range(reps)])
    if device.startswith("cuda"):
        return time_cuda(fn, min_run_time_s)
    return time_cpu(fn, min_run_time_s)


def time_backward(loss_fn: LossFn, student: torch.Tensor, teacher: torch.Tensor, device: str,
                  min_run_time_s: float, min_reps: int, max_reps: int = 500) -> Timing:
    """The backward alone: each sample runs a fresh forward (untimed), then times the gradient.

    A plain loop of single calls (perf_counter on the CPU, CUDA events on a GPU): neither a timed
    block of torch.utils.benchmark nor triton.testing.do_bench can leave out the forward that each
    backward needs (a graph runs backward once).
    """
    cuda = device.startswith("cuda")
    times_s: List[float] = []
    start_wall = time.perf_counter()
    while len(times_s) < max_reps and (
        len(times_s) < min_reps or time.perf_counter() - start_wall < min_run_time_s
    ):
        loss = loss_fn(student, teacher)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            torch.autograd.grad(loss, student)
            end.record()
            torch.cuda.synchronize()
            times_s.append(start.elapsed_time(end) / 1e3)
        else:
            times_s.append(wall_seconds(lambda: torch.autograd.grad(loss, student), device))
        del loss
    return timing_of(times_s)


def time_slow_calls(loss_fn: LossFn, student: torch.Tensor, teacher: torch.Tensor, device: str,
                    modes: Sequence[str], reps: int, step_s: float) -> Dict[str, Timing]:
    """Calls too slow for blocks: ``reps`` single calls each (what blocked_autorange would do with
    blocks of one call), and each forward's own backward is the backward sample, which saves the
    extra forwards of ``time_backward`` (the eager reference's forward takes seconds).
    ``step_s``, a forward+backward already timed after the warm-up, is the first such sample."""
    samples: Dict[str, List[float]] = {mode: [] for mode in modes}
    if "forward" in modes or "backward" in modes:
        for _ in range(reps):
            holder: List[torch.Tensor] = []
            samples.setdefault("forward", []).append(
                wall_seconds(lambda: holder.append(loss_fn(student, teacher)), device))
            samples.setdefault("backward", []).append(
                wall_seconds(lambda: torch.autograd.grad(holder[0], student), device))
            del holder
    if "forward+backward" in modes:
        fn = mode_callable("forward+backward", loss_fn, student, teacher)
        samples["forward+backward"] = [step_s] + [wall_seconds(fn, device) for _ in range(reps - 1)]
    return {mode: timing_of(samples[mode]) for mode in modes}


# ------------------------------------------------------------------------------------------ memory
def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    raise RuntimeError(f"{field} missing from /proc/self/status")


class PeakExtraMemory:
    """Peak memory above the level at ``start()``, in MB (2**20 bytes).

    CPU: the resident set. Writing "5" to /proc/self/clear_refs resets the kernel's high-water mark
    (VmHWM) to the current resident set, so one process can measure one call after another. The
    worker that uses this runs with glibc's mmap threshold lowered (see worker.py), so that freed
    buffers go back to the system instead of being reused unseen by the next call.
    CUDA: ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics.
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.base_mb = 0.0

    def start(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base_mb = torch.cuda.memory_allocated() / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.base_mb = _proc_status_mb("VmRSS")

    def stop(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base_mb
        return max(0.0, _proc_status_mb("VmHWM") - self.base_mb)


# ----------------------------------------------------------------------------- the two measurements
def measure_times(spec: Spec) -> Dict[str, Any]:
    """Median, IQR and minimum per mode, after warm-up; the compiled reference's compile time.

    The first forward+backward compiles (reference_compiled), loads kernels and starts thread pools;
    a second one gives the steady time (for the compiled reference, compile_s is the difference).
    Fast calls are timed in blocks (torch.utils.benchmark on the CPU, triton.testing.do_bench on a
    GPU) for at least ``min_run_time_s``; calls slower than that over ``min_reps`` (and than SLOW_CALL_S) are timed
    one by one, ``min_reps`` times or more.
    """
    student, teacher = make_inputs(spec.batch, spec.classes, spec.dtype, spec.device, spec.seed)
    loss_fn = loss_function(spec.provider, spec.top_k)
    step = mode_callable("forward+backward", loss_fn, student, teacher)
    holder: List[torch.Tensor] = []
    first_s = wall_seconds(lambda: holder.append(loss_fn(student, teacher)), spec.device)
    first_s += wall_seconds(lambda: torch.autograd.grad(holder[0], student), spec.device)
    loss_value = float(holder.pop().detach().float())
    step_s = wall_seconds(step, spec.device)  # the first call after the warm-up
    compile_s = max(0.0, first_s - step_s) if spec.provider == "reference_compiled" else None

    if step_s >= max(SLOW_CALL_S, spec.min_run_time_s / spec.min_reps):
        reps = max(spec.min_reps, math.ceil(spec.min_run_time_s / step_s))
        timings = time_slow_calls(loss_fn, student, teacher, spec.device, spec.modes, reps, step_s)
    else:
        timings = {}
        for mode in spec.modes:
            if mode == "backward":
                timings[mode] = time_backward(loss_fn, student, teacher, spec.device,
                                              spec.min_run_time_s, spec.min_reps)
                continue
            fn = mode_callable(mode, loss_fn, student, teacher)
            once_s = wall_seconds(fn, spec.device)  # warm-up of this mode
            timings[mode] = time_calls(fn, spec.device, once_s, spec.min_run_time_s, spec.min_reps)
    return {
        "loss_value": loss_value,
        "compile_s": compile_s,
        "modes": {mode: timing.__dict__ for mode, timing in timings.items()},
    }


def measure_memory(spec: Spec) -> Dict[str, Any]:
    """Peak extra memory of one call per mode, after a warm-up call.

    The inputs (and, for "backward", the loss with its graph) exist before a measurement starts;
    what the call allocates on top of them (intermediates, saved tensors, gradients) is counted.
    The warm-up (kernels, thread pools) runs on one row, except for the compiled reference, which
    has to compile the real shape.
    """
    student, teacher = make_inputs(spec.batch, spec.classes, spec.dtype, spec.device, spec.seed)
    loss_fn = loss_function(spec.provider, spec.top_k)
    if spec.provider == "reference_compiled":
        warm_student, warm_teacher = student, teacher
    else:
        warm_student, warm_teacher = make_inputs(1, spec.classes, spec.dtype, spec.device, spec.seed)
    mode_callable("forward+backward", loss_fn, warm_student, warm_teacher)()
    del warm_student, warm_teacher

    peak = PeakExtraMemory(spec.device)
    peaks: Dict[str, float] = {}
    if "forward" in spec.modes or "backward" in spec.modes:
        peak.start()
        loss = loss_fn(student, teacher)
        peaks["forward"] = peak.stop()
        peak.start()
        torch.autograd.grad(loss, student)
        peaks["backward"] = peak.stop()
        del loss
    if "forward+backward" in spec.modes:
        step = mode_callable("forward+backward", loss_fn, student, teacher)
        peak.start()
        step()
        peaks["forward+backward"] = peak.stop()
    return {"modes": {mode: peaks[mode] for mode in spec.modes}}


def pairs_per_row(classes: int, top_k: Optional[int]) -> int:
    n = top_k if top_k is not None else classes
    return n * (n - 1) // 2


def cxc_bytes(batch: int, classes: int, top_k: Optional[int], dtype: str) -> int:
    """Bytes of one rows x n x n matrix in the reference's accumulation dtype (n = top_k or C)."""
    n = top_k if top_k is not None else classes
    element = 8 if dtype == "float64" else 4  # the reference accumulates half types in float32
    return batch * n * n * element
