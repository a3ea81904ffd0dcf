"""Where the teacher comes from: a checkpoint of this harness, a plain state_dict, or torchvision's
pretrained weights by name."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

from . import checkpoint
from .config import ConfigError
from .models import build_model


def load_teacher(path: str, arch: Optional[str], num_classes: int,
                 device: torch.device) -> Tuple[nn.Module, str]:
    """A teacher from a checkpoint of this harness (arch stored) or a plain state_dict (``arch``);
    returns the model and its architecture."""
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
    return teacher.to(device).eval(), arch


def pretrained_cache_path(arch: str, name: str) -> str:
    """Where torch's hub cache keeps torchvision's weights ``name`` of ``arch``:
    ``$TORCH_HOME/hub/checkpoints/<file name of the download URL>``."""
    import torchvision

    url = torchvision.models.get_model_weights(arch)[name].url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def load_pretrained_teacher(arch: str, name: str, num_classes: int,
                            device: torch.device) -> nn.Module:
    """torchvision's pretrained ``arch`` (weights ``name``), through its weights API: from torch's
    hub cache, downloaded there first when missing. A ConfigError names the option and the file when
    the weights cannot be had or do not fit."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch)[name]
    classes = len(weights.meta.get("categories") or [])
    if classes and classes != num_classes:
        raise ConfigError(f"--teacher-weights {name} of {arch} has {classes} classes, the data "
                          f"{num_classes}")
    path = pretrained_cache_path(arch, name)
    try:
        state = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
    except Exception as err:  # no network, a damaged file, ...: say which file, before training
        raise ConfigError(f"--teacher-weights {name}: cannot load {arch}'s weights from {path} "
                          f"(downloaded from {weights.url} when missing): {err}") from err
    teacher = build_model(arch, num_classes)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"--teacher-weights {name}: {path} does not fit a {arch}: {err}") from err
    return teacher.to(device).eval()
