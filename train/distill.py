"""Knowledge distillation with the Kendall ranking loss: the training loop and its command line.

    python -m train.distill --train-teacher --epochs 10 --out runs/kd        # shapes1000, CPU/GPU
    python -m train.distill --config my.yaml --rank-weight 0.5               # YAML + overrides
    torchrun --nproc_per_node=8 -m train.distill --data imagenet --data-dir /data/imagenet \\
        --arch resnet18 --teacher-arch resnet50 --teacher-ckpt teacher.pt

The student's loss is::

    ce_weight * CE(student, label)
    + kd_weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + rank_weight * kendall_loss(student, teacher.detach(), k, top_k=...)

Everything a run writes goes under ``--out``: ``config.yaml``, and per phase (``teacher/`` when
``--train-teacher``, ``student/``) ``last.pt`` / ``final.pt`` checkpoints, ``metrics.csv`` and
``curves.png``; ``summary.md`` holds the final table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from rkkd_kernels import kendall_loss
from rkkd_kernels.backends import BACKENDS as KENDALL_BACKENDS

from . import checkpoint
from .data import DATASETS, SHAPES1000_CLASSES, DataBundle, DataError, build_data
from .models import ARCHITECTURES, DESIGN_IMAGE_SIZE, build_model

# Steepness used to measure the (hard) Kendall tau on validation with the fused kernel:
# tanh(1e6 * d) is +-1 in float32 for any |d| > 1e-5, so 1 - loss is Kendall's tau-a.
TAU_METRIC_K = 1e6


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any training starts."""


@dataclass
class Config:
    """Every option of a run. The command line spells ``rank_top_k`` as ``--rank-top-k``."""

    # Data
    data: str = "shapes1000"
    data_dir: Optional[str] = None
    image_size: Optional[int] = None  # default: 32 for shapes1000 and cifar100, 224 for imagenet
    shapes_train_per_class: int = 20
    shapes_val_per_class: int = 5
    augment: bool = True
    # Models
    arch: str = "cifar_resnet8"
    teacher_arch: Optional[str] = None  # default: taken from --teacher-ckpt, or cifar_resnet20x2
    teacher_ckpt: Optional[str] = None
    train_teacher: bool = False
    teacher_epochs: int = 10
    teacher_lr: Optional[float] = None  # default: --lr
    # Loss
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    rank_weight: float = 1.0
    temperature: float = 4.0
    rank_k: float = 1.0
    rank_top_k: Optional[int] = None
    rank_hard_teacher: bool = False
    rank_backend: str = "auto"
    # Optimisation (SGD with Nesterov momentum; linear warm-up, then cosine decay, per step)
    epochs: int = 10
    batch_size: int = 128  # per process
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    max_steps: Optional[int] = None  # stop after this many steps (the schedule is unchanged)
    # Run
    seed: int = 0
    out: str = "runs/distill"
    resume: bool = False
    ckpt_every: int = 0  # also checkpoint every N steps (0: at the end of each epoch only)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    bf16: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    workers: Optional[int] = None  # data loader workers; default 0 for shapes1000, else 4
    threads: Optional[int] = None  # torch CPU threads per process
    progress: bool = True  # tqdm bars
    tau_images: int = 500  # validation images used for the Kendall tau (0: all); it costs C^2 each


# Options that do not change what a run computes: they may differ between a run and its resume.
RESUME_FREE_OPTIONS = {"out", "resume", "max_steps", "ckpt_every", "workers", "threads", "progress",
                       "device", "data_dir", "tau_images"}

HELP = {
    "data": f"dataset: one of {DATASETS}",
    "data_dir": "folder of the imagenet (train/, val/) or cifar100 files",
    "image_size": "square input size (default 32 for shapes1000/cifar100, 224 for imagenet)",
    "shapes_train_per_class": "shapes1000: training images per class",
    "shapes_val_per_class": "shapes1000: validation images per class",
    "augment": "random augmentation of the training images",
    "arch": f"student architecture: one of {sorted(ARCHITECTURES)}",
    "teacher_arch": "teacher architecture (default: from --teacher-ckpt, else cifar_resnet20x2)",
    "teacher_ckpt": "teacher checkpoint written by this harness (or a plain state_dict)",
    "train_teacher": "train the teacher first (CE only), under OUT/teacher",
    "teacher_epochs": "epochs of teacher training",
    "teacher_lr": "teacher learning rate (default: --lr)",
    "ce_weight": "weight of cross-entropy with the labels",
    "kd_weight": "weight of T^2 * KL(teacher_T || student_T)",
    "rank_weight": "weight of the Kendall ranking loss",
    "temperature": "KD temperature T",
    "rank_k": "steepness k of the soft Kendall loss",
    "rank_top_k": "rank only among the teacher's top K classes (default: all)",
    "rank_hard_teacher": "sign() of the teacher's differences instead of tanh",
    "rank_backend": f"kendall_loss backend: one of {KENDALL_BACKENDS}",
    "epochs": "student epochs",
    "batch_size": "batch size per process",
    "lr": "peak learning rate (SGD, Nesterov momentum)",
    "momentum": "SGD momentum",
    "weight_decay": "SGD weight decay",
    "warmup_epochs": "linear warm-up length in epochs (then cosine decay to 0)",
    "max_steps": "stop after N optimizer steps (smoke tests; the schedule is unchanged)",
    "seed": "seed of the data, the initialisation and the augmentation",
    "out": "output folder",
    "resume": "resume from OUT/<phase>/last.pt where one exists",
    "ckpt_every": "also checkpoint every N steps (0: at each epoch end only)",
    "device": "auto, cpu, cuda or cuda:N (torchrun: each process uses cuda:LOCAL_RANK)",
    "bf16": "bf16 autocast on CUDA",
    "workers": "data loader worker processes (default 0 for shapes1000, else 4)",
    "threads": "torch CPU threads per process",
    "progress": "tqdm progress bars",
    "tau_images": "about this many validation images (spread over all) measure the Kendall tau "
                  "(0: all; each costs C^2 pair terms)",
    "config": "YAML file of options (keys as above, - or _); the command line overrides it",
}


# ---------------------------------------------------------------------------------------------
# Configuration: YAML + command line, then validation
# ---------------------------------------------------------------------------------------------


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per Config field, plus ``--config FILE``."""
    parser = argparse.ArgumentParser(
        prog="python -m train.distill",
        description="Distil a student from a teacher with CE + KD + the Kendall ranking loss.",
        argument_default=argparse.SUPPRESS,  # only options actually given override the YAML
    )
    parser.add_argument("--config", help=HELP["config"])
    for item in dataclasses.fields(Config):
        flag = "--" + item.name.replace("_", "-")
        default = item.default
        if item.type in ("bool",) or isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                help=f"{HELP[item.name]} (default {default})")
            continue
        kind = {"int": int, "float": float, "str": str}[
            item.type.replace("Optional[", "").rstrip("]")
        ]
        parser.add_argument(flag, type=_optional(kind) if "Optional" in item.type else kind,
                            metavar=item.name.upper(), help=f"{HELP[item.name]} (default {default})")
    return parser


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML value against the type of Config field ``name``."""
    kinds = {item.name: item.type for item in dataclasses.fields(Config)}
    kind = kinds[name]
    if value is None:
        if "Optional" not in kind:
            raise ConfigError(f"option {name!r} cannot be null")
        return None
    base = kind.replace("Optional[", "").rstrip("]")
    if base == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"option {name!r} must be true or false, got {value!r}")
        return value
    if base == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"option {name!r} must be an integer, got {value!r}")
        return value
    if base == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"option {name!r} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"option {name!r} must be a string, got {value!r}")
    return value


def load_yaml_options(path: str) -> Dict[str, Any]:
    """Options from a YAML mapping; unknown keys and wrong types are errors."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as handle:
        try:
            raw = yaml.safe_load(handle) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of options")
    names = {item.name for item in dataclasses.fields(Config)}
    options = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(f"unknown option {key!r} in {path!r}; known: {sorted(names)}")
        options[name] = _coerce(name, value)
    return options


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Config from defaults, then the YAML file of ``--config``, then the command line; validated."""
    args = vars(build_parser().parse_args(argv))
    options: Dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path is not None:
        options.update(load_yaml_options(config_path))
    options.update(args)
    config = Config(**options)
    validate_config(config)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: Config) -> None:
    """Reject configurations that cannot run, with a message saying what to change."""
    _require(cfg.data in DATASETS, f"--data must be one of {DATASETS}, got {cfg.data!r}")
    if cfg.data != "shapes1000":
        _require(cfg.data_dir is not None, f"--data {cfg.data} needs --data-dir DIR")
        _require(os.path.isdir(cfg.data_dir),
                 f"--data-dir {cfg.data_dir!r} does not exist or is not a directory")
    _require(cfg.image_size is None or cfg.image_size >= 8,
             f"--image-size must be at least 8, got {cfg.image_size}")
    _require(cfg.shapes_train_per_class >= 1 and cfg.shapes_val_per_class >= 1,
             "--shapes-train-per-class and --shapes-val-per-class must be at least 1")
    _require(cfg.arch in ARCHITECTURES,
             f"--arch must be one of {sorted(ARCHITECTURES)}, got {cfg.arch!r}")
    _require(cfg.teacher_arch is None or cfg.teacher_arch in ARCHITECTURES,
             f"--teacher-arch must be one of {sorted(ARCHITECTURES)}, got {cfg.teacher_arch!r}")
    for name in ("ce_weight", "kd_weight", "rank_weight"):
        value = getattr(cfg, name)
        _require(math.isfinite(value) and value >= 0,
                 f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    _require(cfg.ce_weight + cfg.kd_weight + cfg.rank_weight > 0,
             "all loss weights are 0: set at least one of --ce-weight, --kd-weight, --rank-weight")
    needs_teacher = cfg.kd_weight > 0 or cfg.rank_weight > 0
    _require(not (cfg.train_teacher and cfg.teacher_ckpt),
             "give either --teacher-ckpt or --train-teacher, not both")
    _require(not needs_teacher or cfg.train_teacher or cfg.teacher_ckpt is not None,
             "--kd-weight or --rank-weight > 0 needs a teacher: pass --teacher-ckpt PATH or "
             "--train-teacher (or set both weights to 0)")
    if cfg.teacher_ckpt is not None:
        _require(os.path.isfile(cfg.teacher_ckpt),
                 f"--teacher-ckpt {cfg.teacher_ckpt!r} does not exist")
    _require(math.isfinite(cfg.temperature) and cfg.temperature > 0,
             f"--temperature must be > 0, got {cfg.temperature}")
    _require(math.isfinite(cfg.rank_k) and cfg.rank_k > 0,
             f"--rank-k must be a positive finite number, got {cfg.rank_k}")
    _require(cfg.rank_top_k is None or cfg.rank_top_k >= 2,
             f"--rank-top-k must be at least 2 (or none), got {cfg.rank_top_k}")
    _require(cfg.rank_backend in KENDALL_BACKENDS,
             f"--rank-backend must be one of {KENDALL_BACKENDS}, got {cfg.rank_backend!r}")
    for name in ("epochs", "teacher_epochs", "batch_size"):
        _require(getattr(cfg, name) >= 1,
                 f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    _require(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    _require(cfg.teacher_lr is None or (math.isfinite(cfg.teacher_lr) and cfg.teacher_lr > 0),
             f"--teacher-lr must be > 0, got {cfg.teacher_lr}")
    _require(0 <= cfg.momentum < 1, f"--momentum must lie in [0, 1), got {cfg.momentum}")
    _require(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    _require(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    _require(cfg.max_steps is None or cfg.max_steps >= 1,
             f"--max-steps must be at least 1 (or none), got {cfg.max_steps}")
    _require(cfg.ckpt_every >= 0, f"--ckpt-every must be >= 0, got {cfg.ckpt_every}")
    _require(cfg.workers is None or cfg.workers >= 0, f"--workers must be >= 0, got {cfg.workers}")
    _require(cfg.threads is None or cfg.threads >= 1, f"--threads must be >= 1, got {cfg.threads}")
    _require(cfg.tau_images >= 0, f"--tau-images must be >= 0, got {cfg.tau_images}")
    _require(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
             f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if cfg.device.startswith("cuda"):
        _require(torch.cuda.is_available(), f"--device {cfg.device} but CUDA is not available here")


# ---------------------------------------------------------------------------------------------
# Processes and devices (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
# ---------------------------------------------------------------------------------------------


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


def _all_reduce_sum(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    if runtime.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _seed_everything(seed: int) -> None:
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


# ---------------------------------------------------------------------------------------------
# One phase of training (the teacher, or the student)
# ---------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """What differs between training the teacher and distilling the student."""

    name: str  # "teacher" or "student": also the folder under --out
    arch: str
    epochs: int
    lr: float
    ce_weight: float
    kd_weight: float
    rank_weight: float
    seed_offset: int
    teacher_steps: Optional[int] = None  # steps of the teacher trained in this run, if any

    def result_options(self, cfg: Config) -> Dict[str, Any]:
        """The options that determine this phase's result (compared on --resume)."""
        options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESUME_FREE_OPTIONS}
        if self.name == "teacher":  # the student-only options do not change the teacher
            for key in STUDENT_ONLY_OPTIONS:
                options.pop(key, None)
        options.update(dataclasses.asdict(self))
        return options


STUDENT_ONLY_OPTIONS = ("arch", "epochs", "lr", "ce_weight", "kd_weight", "rank_weight",
                        "temperature", "rank_k", "rank_top_k", "rank_hard_teacher", "rank_backend",
                        "teacher_ckpt")


# Columns of metrics.csv, in order. Loss terms are unweighted means over the epoch's batches.
CSV_COLUMNS = [
    "epoch", "step", "lr", "train_loss", "train_ce", "train_kd", "train_rank", "train_top1",
    "val_ce", "val_top1", "val_top5", "val_tau", "images_per_s", "rank_time_share", "epoch_s",
]
TERMS = ("ce", "kd", "rank")


def _lr_lambda(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _loss_terms(
    phase: Phase, cfg: Config, student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor],
    labels: torch.Tensor, rank_watch: Stopwatch,
) -> Dict[str, torch.Tensor]:
    """Each loss term with a non-zero weight (unweighted), in float32."""
    terms: Dict[str, torch.Tensor] = {}
    if phase.ce_weight > 0:
        terms["ce"] = F.cross_entropy(student_logits, labels)
    if phase.kd_weight > 0:
        temperature = cfg.temperature
        terms["kd"] = F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            reduction="batchmean", log_target=True,
        ) * temperature**2
    if phase.rank_weight > 0:
        rank_watch.start()
        terms["rank"] = kendall_loss(
            student_logits, teacher_logits.detach(), cfg.rank_k, top_k=cfg.rank_top_k,
            hard_teacher=cfg.rank_hard_teacher, backend=cfg.rank_backend,
        )
        rank_watch.stop()
    return terms


@torch.no_grad()
def evaluate(
    model: nn.Module, teacher: Optional[nn.Module], loader: DataLoader, runtime: Runtime,
    autocast_ctx, tau_stride: int = 1,
) -> Dict[str, float]:
    """Validation CE, top-1, top-5 (in %), and the mean student-teacher Kendall tau per image.

    The tau uses every ``tau_stride``-th image of each batch: it costs C^2 pair terms per image.
    """
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=runtime.device)  # n, ce, top1, top5, n_tau, tau
    for images, labels in loader:
        images = images.to(runtime.device, non_blocking=True)
        labels = labels.to(runtime.device, non_blocking=True)
        with autocast_ctx():
            logits = model(images)
            teacher_logits = teacher(images) if teacher is not None else None
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        sums[0] += labels.numel()
        sums[1] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[2] += hits[:, 0].sum()
        sums[3] += hits.any(dim=1).sum()
        if teacher_logits is not None:
            student_rows = logits[::tau_stride]
            teacher_rows = teacher_logits.float()[::tau_stride]
            # The loss is 1 - tau per row, so sum(tau) = rows - sum(loss).
            sums[4] += student_rows.shape[0]
            sums[5] += student_rows.shape[0] - kendall_loss(
                student_rows, teacher_rows, TAU_METRIC_K, hard_teacher=True, reduction="sum"
            ).double()
    _all_reduce_sum(sums, runtime)
    n = max(1.0, sums[0].item())
    return {
        "val_ce": sums[1].item() / n,
        "val_top1": 100.0 * sums[2].item() / n,
        "val_top5": 100.0 * sums[3].item() / n,
        "val_tau": sums[5].item() / max(1.0, sums[4].item()) if teacher is not None else math.nan,
    }


def write_csv(history: List[Dict[str, Any]], path: str) -> None:
    """metrics.csv: one row per epoch; NaN (a term with weight 0, no teacher) as an empty cell."""
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in history:
            writer.writerow({
                key: ("" if isinstance(row.get(key), float) and math.isnan(row[key])
                      else (f"{row[key]:.6g}" if isinstance(row.get(key), float) else row.get(key)))
                for key in CSV_COLUMNS
            })
    os.replace(path + ".tmp", path)


def plot_history(history: List[Dict[str, Any]], path: str, title: str) -> None:
    """curves.png: training loss terms, validation accuracy, Kendall tau, throughput."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for key in ("train_loss", "train_ce", "train_kd", "train_rank"):
        values = [row[key] for row in history]
        if not all(math.isnan(v) for v in values):
            axes[0, 0].plot(epochs, values, marker="o", label=key)
    axes[0, 0].set_title("training loss terms (unweighted)")
    for key in ("val_top1", "val_top5", "train_top1"):
        axes[0, 1].plot(epochs, [row[key] for row in history], marker="o", label=key)
    axes[0, 1].set_title("accuracy (%)")
    axes[1, 0].plot(epochs, [row["val_tau"] for row in history], marker="o", label="val_tau")
    axes[1, 0].set_title("validation Kendall tau, student vs teacher")
    axes[1, 1].plot(epochs, [row["images_per_s"] for row in history], marker="o",
                    label="images/s")
    axes[1, 1].set_title("training throughput (images/s)")
    for axis in axes.flat:
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def train_phase(
    cfg: Config, phase: Phase, data: DataBundle, teacher: Optional[nn.Module], runtime: Runtime,
) -> Dict[str, Any]:
    """Train one model; returns its summary (final metrics, wall time) and, as "model", the model.

    Resumable at any step: the checkpoint holds the model, optimizer, scheduler, position in the
    epoch, running epoch sums, history and every process's random state. The data order comes from
    DistributedSampler(seed, epoch) and the augmentation from per-sample seeds, so nothing about the
    data depends on the global random state.
    """
    from tqdm import tqdm

    phase_dir = os.path.join(cfg.out, phase.name)
    last_path = os.path.join(phase_dir, "last.pt")
    final_path = os.path.join(phase_dir, "final.pt")
    device = runtime.device
    log = print if runtime.is_main else (lambda *a, **k: None)

    # Everyone builds the same initial model (DDP would broadcast rank 0's anyway).
    _seed_everything(cfg.seed * 1000 + phase.seed_offset)
    model = build_model(phase.arch, data.num_classes).to(device)
    # From here on each process draws its own random numbers (e.g. dropout).
    _seed_everything(cfg.seed * 1000 + phase.seed_offset + 100 * (runtime.rank + 1))

    sampler = DistributedSampler(data.train, num_replicas=runtime.world_size, rank=runtime.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(sampler) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} exceeds the {len(sampler)} training images per process"
        )
    total_steps = steps_per_epoch * phase.epochs
    optimizer = torch.optim.SGD(model.parameters(), lr=phase.lr, momentum=cfg.momentum,
                                nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(warmup_steps, total_steps))

    options = phase.result_options(cfg)
    epoch, step_in_epoch, global_step = 0, 0, 0
    history: List[Dict[str, Any]] = []
    epoch_sums = torch.zeros(6, dtype=torch.float64)  # n, ce, kd, rank, total, top1 (x batch)
    epoch_time = {"seconds": 0.0, "step": 0.0, "rank": 0.0}
    if cfg.resume and os.path.isfile(last_path):
        state = checkpoint.load(last_path, map_location="cpu")
        changed = sorted(k for k in set(options) | set(state["options"])
                         if options.get(k) != state["options"].get(k))
        if changed:
            raise ConfigError(
                f"--resume: {last_path} was written with different options ({', '.join(changed)}); "
                "resume with the same options or choose another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, step_in_epoch = state["epoch"], state["step_in_epoch"]
        global_step, history = state["global_step"], state["history"]
        epoch_sums, epoch_time = state["epoch_sums"].double(), state["epoch_time"]
        rng_states = state["rng"]
        if len(rng_states) == runtime.world_size:
            checkpoint.restore_rng_state(rng_states[runtime.rank])
        else:
            log(f"note: {last_path} holds random states for {len(rng_states)} processes, this run "
                f"has {runtime.world_size}; continuing with fresh random states")
        log(f"[{phase.name}] resumed from {last_path} at epoch {epoch + 1}, step {global_step}")
    elif cfg.resume:
        log(f"[{phase.name}] --resume: no {last_path} yet, starting from scratch")

    train_model: nn.Module = model
    if runtime.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_bf16 = cfg.bf16 and device.type == "cuda"

    def autocast_ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()

    workers = cfg.workers if cfg.workers is not None else (0 if cfg.data == "shapes1000" else 4)
    loader_options = dict(num_workers=workers, pin_memory=device.type == "cuda",
                          persistent_workers=False)
    val_loader = DataLoader(data.val, batch_size=cfg.batch_size * 2,
                            sampler=Shard(len(data.val), runtime.rank, runtime.world_size),
                            generator=torch.Generator().manual_seed(cfg.seed), **loader_options)

    tau_stride = max(1, len(data.val) // cfg.tau_images) if cfg.tau_images > 0 else 1

    def save(complete: bool) -> None:
        rng = checkpoint.capture_rng_state()
        rng_states = [rng]
        if runtime.distributed:
            rng_states = [None] * runtime.world_size
            dist.all_gather_object(rng_states, rng)
        if runtime.is_main:
            state = {
                "phase": phase.name, "arch": phase.arch, "num_classes": data.num_classes,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": global_step,
                "epoch_sums": epoch_sums.clone(), "epoch_time": dict(epoch_time),
                "history": history, "rng": rng_states, "options": options, "complete": complete,
            }
            checkpoint.save_atomic(state, last_path)
            if complete:
                checkpoint.save_atomic(state, final_path)
        if runtime.distributed:
            dist.barrier()

    def epoch_row(epoch_number: int, metrics: Dict[str, float]) -> Dict[str, Any]:
        n = max(1.0, epoch_sums[0].item())
        weights = {"ce": phase.ce_weight, "kd": phase.kd_weight, "rank": phase.rank_weight}
        row: Dict[str, Any] = {"epoch": epoch_number, "step": global_step,
                               "lr": optimizer.param_groups[0]["lr"]}
        for i, term in enumerate(TERMS):
            row[f"train_{term}"] = epoch_sums[1 + i].item() / n if weights[term] > 0 else math.nan
        row["train_loss"] = epoch_sums[4].item() / n
        row["train_top1"] = 100.0 * epoch_sums[5].item() / n
        row.update(metrics)
        row["images_per_s"] = n / max(1e-9, epoch_time["seconds"])
        row["rank_time_share"] = (epoch_time["rank"] / epoch_time["step"]
                                  if phase.rank_weight > 0 and epoch_time["step"] > 0 else math.nan)
        row["epoch_s"] = epoch_time["seconds"]
        return row

    if runtime.is_main:
        os.makedirs(phase_dir, exist_ok=True)
    if teacher is not None:
        teacher.eval()
    # A teacher given to a CE-only phase is used only to measure the validation tau.
    uses_teacher = teacher is not None and (phase.kd_weight > 0 or phase.rank_weight > 0)
    log(f"[{phase.name}] {phase.arch}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{phase.epochs} epochs x {steps_per_epoch} steps x {cfg.batch_size} images x "
        f"{runtime.world_size} process(es) on {device}")
    phase_start = time.perf_counter()
    stopped_early = False
    shown = history
    while epoch < phase.epochs and not stopped_early:
        model.train()
        sampler.set_epoch(epoch)
        if hasattr(data.train, "set_epoch"):
            data.train.set_epoch(epoch)
        loader = DataLoader(data.train, batch_size=cfg.batch_size,
                            sampler=SkipFirst(sampler, step_in_epoch * cfg.batch_size),
                            drop_last=True, generator=torch.Generator().manual_seed(cfg.seed + epoch),
                            **loader_options)
        sums = epoch_sums.to(device)
        step_watch, rank_watch = Stopwatch(device), Stopwatch(device)
        bar = tqdm(total=steps_per_epoch, initial=step_in_epoch, leave=False, dynamic_ncols=True,
                   desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
                   disable=not (cfg.progress and runtime.is_main))
        wall_start = time.perf_counter()
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            step_watch.start()
            with autocast_ctx():
                logits = train_model(images)
                teacher_logits = None
                if uses_teacher:
                    with torch.no_grad():
                        teacher_logits = teacher(images)
            logits = logits.float()
            teacher_logits = teacher_logits.float() if teacher_logits is not None else None
            terms = _loss_terms(phase, cfg, logits, teacher_logits, labels, rank_watch)
            total = sum(getattr(phase, f"{name}_weight") * value for name, value in terms.items())
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            step_watch.stop()

            with torch.no_grad():
                batch = labels.numel()
                values = [terms[t].detach().double() * batch if t in terms else
                          torch.zeros((), dtype=torch.float64, device=device) for t in TERMS]
                correct = (logits.argmax(1) == labels).sum().double()
                sums += torch.stack([torch.tensor(float(batch), dtype=torch.float64, device=device),
                                     *values, total.detach().double() * batch, correct])
            step_in_epoch += 1
            global_step += 1
            bar.update(1)
            if global_step % 20 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{sums[4].item() / sums[0].item():.3f}")
            at_limit = cfg.max_steps is not None and global_step >= cfg.max_steps
            periodic = cfg.ckpt_every > 0 and global_step % cfg.ckpt_every == 0
            if (at_limit or periodic) and step_in_epoch < steps_per_epoch:
                epoch_sums = sums.cpu()
                epoch_time["seconds"] += time.perf_counter() - wall_start
                epoch_time["step"] += step_watch.total()
                epoch_time["rank"] += rank_watch.total()
                step_watch, rank_watch = Stopwatch(device), Stopwatch(device)
                save(complete=False)
                wall_start = time.perf_counter()
            if at_limit:
                stopped_early = True
                break
        bar.close()
        if step_in_epoch >= steps_per_epoch:  # (not already accounted for by a mid-epoch save)
            epoch_sums = sums.cpu()
            epoch_time["seconds"] += time.perf_counter() - wall_start
            epoch_time["step"] += step_watch.total()
            epoch_time["rank"] += rank_watch.total()
        # Sum the epoch's statistics over processes (the per-process sums stay in the checkpoint).
        global_sums = _all_reduce_sum(epoch_sums.to(device), runtime).cpu()
        local_sums, epoch_sums = epoch_sums, global_sums
        metrics = evaluate(model, teacher, val_loader, runtime, autocast_ctx, tau_stride)
        row = epoch_row(epoch + 1, metrics)
        epoch_sums = local_sums
        if step_in_epoch >= steps_per_epoch:
            history.append(row)
            epoch, step_in_epoch = epoch + 1, 0
            epoch_sums = torch.zeros(6, dtype=torch.float64)
            epoch_time = {"seconds": 0.0, "step": 0.0, "rank": 0.0}
            save(complete=epoch == phase.epochs)
            shown = history
        else:
            row["epoch"] = epoch + step_in_epoch / steps_per_epoch  # a partial epoch
            shown = history + [row]
        if runtime.is_main:
            write_csv(shown, os.path.join(phase_dir, "metrics.csv"))
            plot_history(shown, os.path.join(phase_dir, "curves.png"),
                         f"{phase.name}: {phase.arch} on {cfg.data}")
            log(f"[{phase.name}] epoch {row['epoch']:.4g}: " + ", ".join(
                f"{key} {row[key]:.4g}" for key in
                ("train_loss", "val_top1", "val_top5", "val_tau", "images_per_s", "rank_time_share")
                if not (isinstance(row[key], float) and math.isnan(row[key]))))
    final = shown[-1] if shown else {}
    return {
        "phase": phase.name, "arch": phase.arch, "model": model, "history": shown,
        "epochs": final.get("epoch", 0), "steps": global_step, "complete": epoch == phase.epochs,
        "wall_s": time.perf_counter() - phase_start, **{k: final.get(k, math.nan) for k in (
            "val_top1", "val_top5", "val_tau", "val_ce", "images_per_s", "rank_time_share")},
        "best_val_top1": max((r["val_top1"] for r in shown), default=math.nan),
    }


# ---------------------------------------------------------------------------------------------
# The teacher
# ---------------------------------------------------------------------------------------------


def load_teacher(path: str, arch: Optional[str], num_classes: int, device: torch.device) -> nn.Module:
    """A teacher from a checkpoint of this harness (arch stored) or a plain state_dict (``arch``)."""
    state = checkpoint.load(path, map_location="cpu")
    if isinstance(state, dict) and "model" in state and "arch" in state:
        if arch is not None and arch != state["arch"]:
            raise ConfigError(f"--teacher-arch {arch} but {path} holds a {state['arch']}")
        arch, weights = state["arch"], state["model"]
    else:
        if arch is None:
            raise ConfigError(f"{path} is a plain state_dict: say its architecture with --teacher-arch")
        weights = state
    teacher = build_model(arch, num_classes)
    try:
        teacher.load_state_dict(weights)
    except RuntimeError as err:
        raise ConfigError(f"{path} does not fit a {arch} with {num_classes} classes: {err}") from err
    return teacher.to(device).eval()


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: List[Dict[str, Any]], columns: List[str]) -> str:
    """A Markdown table of ``rows`` (dicts), NaN shown as '-'."""
    cells = [[_format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


SUMMARY_COLUMNS = ["phase", "arch", "epochs", "steps", "val_top1", "best_val_top1", "val_top5",
                   "val_tau", "images_per_s", "rank_time_share", "wall_s"]


def _probe_rank_backend(cfg: Config, device: torch.device) -> None:
    """Fail before training when the chosen kendall_loss backend cannot run on this device."""
    probe = torch.zeros(2, 3, device=device)
    try:
        kendall_loss(probe, probe, cfg.rank_k, backend=cfg.rank_backend)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"--rank-backend {cfg.rank_backend}: {err}") from err


def run(cfg: Config) -> List[Dict[str, Any]]:
    """Run a configuration (teacher phase if asked, then the student); returns the summaries."""
    validate_config(cfg)
    runtime = setup_runtime(cfg)
    try:
        return _run(cfg, runtime)
    finally:
        if runtime.distributed and dist.is_initialized():
            # Free the process group while Python is alive: the DDP wrapper that holds it sits in
            # reference cycles, before and after destroy_process_group drops the registry's hold.
            # Left to the collector in interpreter shutdown, a gloo thread still dropping its last
            # work's tensors cannot take the GIL and aborts the process (SIGABRT; seen in the
            # 2-process test about 1 run in 4 under disk load, 0 in 32 with these collections).
            gc.collect()
            dist.destroy_process_group()
            gc.collect()


def _run(cfg: Config, runtime: Runtime) -> List[Dict[str, Any]]:
    if cfg.image_size is None:
        cfg = dataclasses.replace(cfg, image_size=224 if cfg.data == "imagenet" else 32)
    log = print if runtime.is_main else (lambda *a, **k: None)
    if cfg.rank_weight > 0:
        _probe_rank_backend(cfg, runtime.device)
    data = build_data(cfg.data, cfg.data_dir, cfg.image_size, cfg.seed,
                      cfg.shapes_train_per_class, cfg.shapes_val_per_class, cfg.augment)
    if cfg.rank_top_k is not None and cfg.rank_top_k > data.num_classes:
        raise ConfigError(f"--rank-top-k {cfg.rank_top_k} exceeds the {data.num_classes} classes")
    for arch in filter(None, (cfg.arch, cfg.teacher_arch)):
        if DESIGN_IMAGE_SIZE[arch] != cfg.image_size:
            log(f"note: {arch} is designed for {DESIGN_IMAGE_SIZE[arch]} px inputs; "
                f"running at {cfg.image_size} px")
    if runtime.is_main:
        import yaml

        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.yaml"), "w") as handle:
            yaml.safe_dump(dataclasses.asdict(cfg), handle, sort_keys=False)

    summaries: List[Dict[str, Any]] = []
    needs_teacher = cfg.kd_weight > 0 or cfg.rank_weight > 0
    teacher: Optional[nn.Module] = None
    teacher_steps: Optional[int] = None  # a trained teacher's steps: part of the student's identity
    if cfg.teacher_ckpt is not None:
        teacher = load_teacher(cfg.teacher_ckpt, cfg.teacher_arch, data.num_classes, runtime.device)
    elif cfg.train_teacher:
        teacher_phase = Phase("teacher", cfg.teacher_arch or "cifar_resnet20x2", cfg.teacher_epochs,
                              cfg.teacher_lr or cfg.lr, 1.0, 0.0, 0.0, seed_offset=1)
        summary = train_phase(cfg, teacher_phase, data, None, runtime)
        summaries.append(summary)
        if not summary["complete"]:
            log("[teacher] stopped by --max-steps before its end; distilling from it as it is")
        teacher = summary["model"].eval()
        teacher_steps = summary["steps"]
    if teacher is not None:
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)

    student_phase = Phase("student", cfg.arch, cfg.epochs, cfg.lr, cfg.ce_weight,
                          cfg.kd_weight if needs_teacher else 0.0,
                          cfg.rank_weight if needs_teacher else 0.0, seed_offset=2,
                          teacher_steps=teacher_steps)
    summaries.append(train_phase(cfg, student_phase, data, teacher, runtime))
    _print_summary(cfg, summaries, runtime)
    return summaries


def _print_summary(cfg: Config, summaries: List[Dict[str, Any]], runtime: Runtime) -> None:
    if not runtime.is_main:
        return
    table = format_table(summaries, SUMMARY_COLUMNS)
    print("\n" + table)
    with open(os.path.join(cfg.out, "summary.md"), "w") as handle:
        handle.write(table + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point: configuration errors exit with status 2 and one clear line."""
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
