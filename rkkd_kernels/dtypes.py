"""The dtype rules that every backend and the reference share (docs/contract.md, "Dtypes")."""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes and accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
