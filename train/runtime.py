"""Processes, devices, seeds, samplers and timing: where and in what order a run computes.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; one process per device.
"""

from __future__ import annotations

import gc
import os
import random
import time
from dataclasses import dataclass, field
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from .config import Config


@dataclass
class Runtime:
    """Where this process runs: rank, world size, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(cfg: Config) -> Runtime:
    """Pick the device, start the process group under torchrun (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "auto":
        use_cuda = torch.cuda.is_available()
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    elif cfg.device == "cuda" or (cfg.device.startswith("cuda") and world_size > 1):
        device = torch.device(f"cuda:{local_rank}")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = cfg.threads
    if threads is None and world_size > 1 and device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        threads = max(1, (os.cpu_count() or 1) // local_world)  # don't oversubscribe the cores
    if threads is not None:
        torch.set_num_threads(threads)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """``tensor`` summed over the processes, in place (unchanged in a single process)."""
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Samplers: a resumable training order, an unpadded validation shard
# ---------------------------------------------------------------------------------------------


class SkipFirst(Sampler):
    """The indices of ``sampler`` after the first ``skip`` ones (to resume inside an epoch)."""

    def __init__(self, sampler: Sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self) -> Iterator[int]:
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield index

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)


class Shard(Sampler):
    """Indices ``rank, rank + world, ...``: every validation image counted exactly once overall."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# ---------------------------------------------------------------------------------------------
# Timing that does not stall a GPU every step
# ---------------------------------------------------------------------------------------------


class Stopwatch:
    """Accumulates the time of intervals: wall clock on CPU, CUDA events (read at the end) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.pending: List[Any] = []
        self._start: Any = None

    def start(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self._start, end))
        else:
            self.seconds += time.perf_counter() - self._start

    def total(self) -> float:
        """Seconds so far (synchronises the GPU once)."""
        if self.pending:
            self.pending[-1][1].synchronize()
            self.seconds += sum(a.elapsed_time(b) for a, b in self.pending) / 1000.0
            self.pending = []
        return self.seconds


def shutdown_runtime(runtime: Runtime) -> None:
    """Free the process group while Python is alive (torchrun runs).

    The DDP wrapper that holds it sits in reference cycles, before and after destroy_process_group
    drops the registry's hold. Left to the collector in interpreter shutdown, a gloo thread still
    dropping its last work's tensors cannot take the GIL and aborts the process (SIGABRT; seen in
    the 2-process test about 1 run in 4 under disk load, 0 in 32 with these collections).
    """
    if runtime.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def autocaster(cfg: Config, device: torch.device) -> Callable[[], Any]:
    """A context factory: bf16 autocast on CUDA when --bf16, else nothing."""
    use_bf16 = cfg.bf16 and device.type == "cuda"

    def autocast_ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    return autocast_ctx


def loader_options(cfg: Config, device: torch.device) -> Dict[str, Any]:
    """DataLoader settings: --workers (default 0 for the in-memory shapes1000, else 4)."""
    workers = cfg.workers if cfg.workers is not None else (0 if cfg.data == "shapes1000" else 4)
    return dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
