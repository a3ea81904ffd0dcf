"""Checkpoints: atomic writes, and the random state needed to resume a run exactly.

Also the checkpoints of a training phase: what they hold, and resuming from them.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that it loads with
``torch.load(weights_only=True)`` (no pickled code runs on load).
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch


def save_atomic(state: Dict[str, Any], path: str) -> None:
    """Write ``state`` to ``path`` so that a reader sees the old file or the new one, never half.

    The bytes go to a temporary file in the same directory (same file system), are flushed to disk,
    and the file is then renamed over ``path`` (``os.replace`` is atomic on POSIX and Windows).
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=directory)
    try:
        with os.fdopen(handle, "wb") as temp_file:
            torch.save(state, temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def load(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_atomic`, safely (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state() -> Dict[str, Any]:
    """The Python, NumPy, torch CPU and (if present) CUDA random states, as weights-only types."""
    version, mt_state, gauss_next = random.getstate()
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [version, list(mt_state), gauss_next],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state`: put every random state back as it was."""
    version, mt_state, gauss_next = state["python"]
    random.setstate((version, tuple(mt_state), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state((
        "MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
        numpy_state["has_gauss"], numpy_state["cached_gaussian"],
    ))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---------------------------------------------------------------------------------------------
# A training phase's checkpoints: OUT/<phase>/last.pt (latest) and final.pt (complete run)
# ---------------------------------------------------------------------------------------------


def save_phase(state: Dict[str, Any], phase_dir: str, complete: bool) -> None:
    """Write a phase's state to ``last.pt``, and to ``final.pt`` too when the phase is complete."""
    save_atomic(state, os.path.join(phase_dir, "last.pt"))
    if complete:
        save_atomic(state, os.path.join(phase_dir, "final.pt"))


def resume_phase(
    path: str, options: Dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    scheduler: Any, rank: int, world_size: int, log: Callable[[str], None],
) -> Optional[Dict[str, Any]]:
    """Load a phase's checkpoint into the model, optimizer, scheduler and this process's random state.

    Returns the rest of the saved state (position, history, running statistics), or None when
    there is no checkpoint yet. A checkpoint written with other result-relevant ``options`` is
    refused (``ValueError`` naming them): continuing it would mix two runs.
    """
    from .config import ConfigError

    if not os.path.isfile(path):
        return None
    state = load(path, map_location="cpu")
    changed = sorted(k for k in set(options) | set(state["options"])
                     if options.get(k) != state["options"].get(k))
    if changed:
        raise ConfigError(
            f"--resume: {path} was written with different options ({', '.join(changed)}); "
            "resume with the same options or choose another --out"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng_states = state["rng"]
    if len(rng_states) == world_size:
        restore_rng_state(rng_states[rank])
    else:
        log(f"note: {path} holds random states for {len(rng_states)} processes, this run "
            f"has {world_size}; continuing with fresh random states")
    return state
