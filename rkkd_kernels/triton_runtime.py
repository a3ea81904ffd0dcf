"""How the Triton ops run: interpreted or compiled, on their inputs' device, registered as ops.

``INTERPRETING`` is read once, at import: the kernels are registered one way or the other then, so
setting ``TRITON_INTERPRET`` later changes nothing. This module does not import Triton: backends reads
the flag whether or not Triton is installed.
"""

from __future__ import annotations

import contextlib
import os
import struct
from typing import Callable, Tuple

import torch

from . import ops

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

# The most rows one call takes: the kernels' grids put rows on axis 0 (at most 2^31 - 1 programs).
MAX_GRID_ROWS = 2**31 - 1


def launcher(kernel):
    """``kernel[grid](...)`` as an op body calls it.

    On the GPU through ``wrap_triton``, so that torch.compile sees the kernels inside the op. Under
    the interpreter the kernels are plain Python and the op is opaque (see register_op): call them
    as is.
    """
    return kernel if INTERPRETING else torch.library.wrap_triton(kernel)


def on_device_of(tensor: torch.Tensor):
    """A context that makes ``tensor``'s GPU Triton's current device for the launches inside.

    Triton launches on the current device and its current stream, not on the arguments' device:
    inputs on cuda:1 while cuda:0 is current would run on the wrong GPU. Under the interpreter
    (CPU tensors) there is no device to set.
    """
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def float32_halves(x: float) -> Tuple[float, float]:
    """x = hi + lo with hi, lo float32 values (Triton passes Python floats as float32); a kernel
    adds them back in its accumulation dtype (triton_pair_math.from_halves): ~48 bits of x."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    lo = struct.unpack("f", struct.pack("f", x - hi))[0]
    return hi, lo


def register_op(op_name: str, body: Callable):
    """Register ``body`` as op ``op_name`` with the shared schema, fake, autograd and vmap (ops.py).

    The schema is given rather than inferred. Under the interpreter an opaque ``custom_op``: fake
    tensors cannot run interpreted kernels, so torch.compile must not trace into the body, and the
    shared fake gives it the output shapes. On the GPU a ``triton_op``: torch.compile (Inductor)
    sees and schedules the kernels, and the body, run on fake tensors, is the fake implementation.
    """
    if INTERPRETING:
        op = torch.library.custom_op(op_name, mutates_args=(), schema=ops.SCHEMA)(body)
        op.register_fake(ops.kendall_fake)
    else:
        op = torch.library.triton_op(op_name, mutates_args=(), schema=ops.SCHEMA)(body)
    ops.register_autograd_and_vmap(op_name)
    return op
