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
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from rkkd_kernels import BACKENDS as KENDALL_BACKENDS

from .data import DATASETS
from .models import ARCHITECTURES


SCHEDULES = ("cosine", "step")
RECIPES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes")


class ConfigError(ValueError):
    """A configuration that cannot run; raised before any training starts."""


def recipe_names() -> List[str]:
    """The names of the YAML files in train/recipes/ (without .yaml)."""
    if not os.path.isdir(RECIPES_DIR):
        return []
    return sorted(name[:-5] for name in os.listdir(RECIPES_DIR) if name.endswith(".yaml"))


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
    teacher_weights: Optional[str] = None  # torchvision's pretrained weights, e.g. IMAGENET1K_V1
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
    # Optimisation (SGD; linear warm-up, then cosine decay per step or a step schedule)
    epochs: int = 10
    batch_size: int = 128  # per process
    global_batch_size: Optional[int] = None  # over all processes; sets batch_size
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.5
    schedule: str = "cosine"  # cosine or step
    milestones: List[int] = field(default_factory=list)  # step: epochs where the lr drops
    lr_gamma: float = 0.1  # step: the factor at each milestone
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
    "teacher_weights": "torchvision's pretrained weights for --teacher-arch by name, e.g. "
                       "IMAGENET1K_V1 (downloaded to torch's hub cache, $TORCH_HOME)",
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
    "global_batch_size": "batch size over all processes (sets --batch-size to it / world size)",
    "lr": "peak learning rate (SGD)",
    "momentum": "SGD momentum",
    "nesterov": "Nesterov momentum",
    "weight_decay": "SGD weight decay",
    "warmup_epochs": "linear warm-up length in epochs, per step (0: none)",
    "schedule": f"learning rate after the warm-up: one of {SCHEDULES} (cosine: to 0 per step; "
                "step: x --lr-gamma at each of --milestones)",
    "milestones": "--schedule step: the epochs at whose start the lr is multiplied by --lr-gamma",
    "lr_gamma": "--schedule step: the factor at each milestone",
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
    "recipe": f"a standard setting from train/recipes/ by name: one of {recipe_names()} "
              "(like --config; given both, --config overrides the recipe)",
}


# ---------------------------------------------------------------------------------------------
# Configuration: YAML + command line, then validation
# ---------------------------------------------------------------------------------------------


def _field_type(name: str) -> Tuple[Any, bool]:
    """The type of Config field ``name`` with Optional[...] taken off, and whether it was there."""
    kind = typing.get_type_hints(Config)[name]
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and type(None) in args:
        (inner,) = (arg for arg in args if arg is not type(None))
        return inner, True
    return kind, False


def _optional(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str):
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The command line: one option per Config field, plus ``--config FILE`` and ``--recipe NAME``."""
    parser = argparse.ArgumentParser(
        prog="python -m train.distill",
        description="Distil a student from a teacher with CE + KD + the Kendall ranking loss.",
        argument_default=argparse.SUPPRESS,  # only options actually given override the YAML
    )
    parser.add_argument("--config", help=HELP["config"])
    parser.add_argument("--recipe", help=HELP["recipe"])
    for item in dataclasses.fields(Config):
        flag = "--" + item.name.replace("_", "-")
        default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
        help_text = f"{HELP[item.name]} (default {default})"
        kind, optional = _field_type(item.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(kind) is list:
            (element,) = typing.get_args(kind)
            parser.add_argument(flag, type=element, nargs="+", metavar="N", help=help_text)
        else:
            parser.add_argument(flag, type=_optional(kind) if optional else kind,
                                metavar=item.name.upper(), help=help_text)
    return parser


# What a YAML value of each field type must be: (test, the error's wording). YAML gives ints where
# floats are asked for; bool is an int in Python, and never a number here.
_YAML_KINDS: Dict[Any, Tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _coerce(name: str, value: Any) -> Any:
    """Check a YAML value against the type of Config field ``name``."""
    kind, optional = _field_type(name)
    if value is None:
        if not optional:
            raise ConfigError(f"option {name!r} cannot be null")
        return None
    if typing.get_origin(kind) is list:
        (element,) = typing.get_args(kind)
        accepts, _ = _YAML_KINDS[element]
        if not isinstance(value, list) or not all(accepts(v) for v in value):
            raise ConfigError(f"option {name!r} must be a list of integers, got {value!r}")
        return list(value)
    accepts, wording = _YAML_KINDS[kind]
    if not accepts(value):
        raise ConfigError(f"option {name!r} must be {wording}, got {value!r}")
    return float(value) if kind is float else value


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


def recipe_path(name: str) -> str:
    """The file of recipe ``name``; a ConfigError listing the recipes when there is none."""
    path = os.path.join(RECIPES_DIR, f"{name}.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"--recipe {name!r} does not exist; known recipes: {recipe_names()}")
    return path


def parse_config(argv: Optional[Sequence[str]] = None) -> Config:
    """Config from defaults, then ``--recipe``, then the YAML file of ``--config``, then the command
    line; checked (:func:`validate_config`) and its batch size resolved for this world size."""
    args = vars(build_parser().parse_args(argv))
    options: Dict[str, Any] = {}
    recipe, config_path = args.pop("recipe", None), args.pop("config", None)
    for path in filter(None, (recipe and recipe_path(recipe), config_path)):
        options.update(load_yaml_options(path))
    options.update(args)
    config = Config(**options)
    validate_config(config)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if config.global_batch_size is not None and "batch_size" in options:
        _require(options["batch_size"] * world_size == config.global_batch_size,
                 f"--batch-size {options['batch_size']} x {world_size} process(es) is not "
                 f"--global-batch-size {config.global_batch_size}: give one of the two")
    return resolve_batch_size(config, world_size)


def resolve_batch_size(cfg: Config, world_size: int) -> Config:
    """``cfg`` with ``batch_size`` (per process) set from ``global_batch_size``, if given."""
    if cfg.global_batch_size is None:
        return cfg
    _require(cfg.global_batch_size % world_size == 0,
             f"--global-batch-size {cfg.global_batch_size} is not divisible by the {world_size} "
             "processes (WORLD_SIZE)")
    return dataclasses.replace(cfg, batch_size=cfg.global_batch_size // world_size)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_config(cfg: Config) -> None:
    """Reject configurations that cannot run, with a message naming the option to change."""
    _check_data_and_models(cfg)
    _check_teacher(cfg)
    _check_loss(cfg)
    _check_solver(cfg)
    _check_run(cfg)


def _check_data_and_models(cfg: Config) -> None:
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


def _check_teacher(cfg: Config) -> None:
    sources = [name for name, given in (("--teacher-ckpt", cfg.teacher_ckpt is not None),
                                        ("--teacher-weights", cfg.teacher_weights is not None),
                                        ("--train-teacher", cfg.train_teacher)) if given]
    _require(len(sources) <= 1, f"give one teacher source, not both {' and '.join(sources)}")
    needs_teacher = cfg.kd_weight > 0 or cfg.rank_weight > 0
    _require(not needs_teacher or sources,
             "--kd-weight or --rank-weight > 0 needs a teacher: pass --teacher-ckpt PATH, "
             "--teacher-weights NAME or --train-teacher (or set both weights to 0)")
    if cfg.teacher_ckpt is not None:
        _require(os.path.isfile(cfg.teacher_ckpt),
                 f"--teacher-ckpt {cfg.teacher_ckpt!r} does not exist")
    if cfg.teacher_weights is not None:
        _require(cfg.teacher_arch is not None,
                 f"--teacher-weights {cfg.teacher_weights} needs --teacher-arch")
        known = pretrained_weight_names(cfg.teacher_arch)
        _require(bool(known), f"--teacher-weights: torchvision has no pretrained weights for "
                              f"--teacher-arch {cfg.teacher_arch}")
        _require(cfg.teacher_weights in known,
                 f"--teacher-weights {cfg.teacher_weights!r}: torchvision's weights for "
                 f"{cfg.teacher_arch} are {known}")


def pretrained_weight_names(arch: str) -> List[str]:
    """The names of torchvision's pretrained weights for ``arch`` (none for this harness's own)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(arch)
    except ValueError:  # not a torchvision model (cifar_*, mobilenet_v1)
        return []
    return list(weights.__members__)


def _check_loss(cfg: Config) -> None:
    for name in ("ce_weight", "kd_weight", "rank_weight"):
        value = getattr(cfg, name)
        _require(math.isfinite(value) and value >= 0,
                 f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    _require(cfg.ce_weight + cfg.kd_weight + cfg.rank_weight > 0,
             "all loss weights are 0: set at least one of --ce-weight, --kd-weight, --rank-weight")
    _require(math.isfinite(cfg.temperature) and cfg.temperature > 0,
             f"--temperature must be > 0, got {cfg.temperature}")
    _require(math.isfinite(cfg.rank_k) and cfg.rank_k > 0,
             f"--rank-k must be a positive finite number, got {cfg.rank_k}")
    _require(cfg.rank_top_k is None or cfg.rank_top_k >= 2,
             f"--rank-top-k must be at least 2 (or none), got {cfg.rank_top_k}")
    _require(cfg.rank_backend in KENDALL_BACKENDS,
             f"--rank-backend must be one of {KENDALL_BACKENDS}, got {cfg.rank_backend!r}")


def _check_solver(cfg: Config) -> None:
    for name in ("epochs", "teacher_epochs", "batch_size"):
        _require(getattr(cfg, name) >= 1,
                 f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    _require(cfg.global_batch_size is None or cfg.global_batch_size >= 1,
             f"--global-batch-size must be at least 1, got {cfg.global_batch_size}")
    _require(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    _require(cfg.teacher_lr is None or (math.isfinite(cfg.teacher_lr) and cfg.teacher_lr > 0),
             f"--teacher-lr must be > 0, got {cfg.teacher_lr}")
    _require(0 <= cfg.momentum < 1, f"--momentum must lie in [0, 1), got {cfg.momentum}")
    _require(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    _require(cfg.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {cfg.warmup_epochs}")
    _require(cfg.schedule in SCHEDULES,
             f"--schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.schedule == "step":
        _require(bool(cfg.milestones), "--schedule step needs --milestones (epochs, increasing)")
        _require(all(m >= 1 for m in cfg.milestones)
                 and all(a < b for a, b in zip(cfg.milestones, cfg.milestones[1:])),
                 f"--milestones must be strictly increasing epochs >= 1, got {cfg.milestones}")
        _require(cfg.milestones[-1] < cfg.epochs,
                 f"--milestones {cfg.milestones}: epoch {cfg.milestones[-1]} is not before the "
                 f"end of the --epochs {cfg.epochs} run, so it never applies")
        # A teacher trained here follows the same schedule over its own epochs.
        _require(not cfg.train_teacher or cfg.milestones[-1] < cfg.teacher_epochs,
                 f"--milestones {cfg.milestones}: with --train-teacher the teacher uses them too, "
                 f"and epoch {cfg.milestones[-1]} is not before the end of its --teacher-epochs "
                 f"{cfg.teacher_epochs}")
        _require(math.isfinite(cfg.lr_gamma) and 0 < cfg.lr_gamma <= 1,
                 f"--lr-gamma must lie in (0, 1], got {cfg.lr_gamma}")
    else:
        _require(not cfg.milestones,
                 f"--milestones {cfg.milestones} applies only to --schedule step "
                 f"(--schedule is {cfg.schedule})")


def _check_run(cfg: Config) -> None:
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
