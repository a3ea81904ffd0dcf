"""What the harness tests share: a small teacher checkpoint and the CSV reader (test_train.py,
test_train_options.py)."""

from __future__ import annotations

import csv

import pytest
import torch

from train import checkpoint
from train.data import SHAPES1000_CLASSES
from train.models import build_model


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> str:
    """A (randomly initialised) cifar_resnet8 teacher in the harness's checkpoint format."""
    torch.manual_seed(123)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    model = build_model("cifar_resnet8", SHAPES1000_CLASSES)
    checkpoint.save_atomic({"arch": "cifar_resnet8", "model": model.state_dict()}, path)
    return path


def read_csv(path: str):
    with open(path) as handle:
        return list(csv.DictReader(handle))
