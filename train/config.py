"""The options of a run: the dataclass, the command line and YAML that fill it, and their checks.

Every option is a field of :class:`Config`; ``--rank-top-k`` on the command line, ``rank_top_k`` or
``rank-top-k`` in YAML. :func:`parse_config` applies the defaults, then the YAML file of
``--config``, then the command line, and checks the result once, before anything runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

import torch

from rkkd_kernels.backends import BACKENDS as KENDALL_BACKENDS

from .data import DATASETS
from .models import ARCHITECTURES


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
