"""Where the teacher comes from: a checkpoint of this harness or a plain state_dict."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import checkpoint
from .config import ConfigError
from .models import build_model


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
