"""Public tools for the Triton pair kernel: its compiled forms, for Triton's ahead-of-time compiler
(no GPU needed), and how this process launches it.

    import triton
    from triton.backends.compiler import GPUTarget
    from rkkd_kernels import triton_tools

    variant = triton_tools.KernelVariant("pairs", "float32", hard=False, need_gs=True, need_gt=False,
                                         fused=True, block=64, num_warps=8)
    compiled = triton.compile(variant.source(), target=GPUTarget("cuda", 90, 32),
                              options=variant.options())

Importing this module needs Triton; compiling needs TRITON_INTERPRET unset (the interpreter replaces
the kernels' compiled form). ``benchmarks/triton_aot.py`` and ``benchmarks/sass_loop.py`` use it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Tuple

import torch

from . import triton_pairs
from .triton_runtime import INTERPRETING

# (BLOCK, num_warps) of each configuration the autotuner chooses from.
GPU_CONFIGS: List[Tuple[int, int]] = [(c.kwargs["BLOCK"], c.num_warps) for c in triton_pairs.GPU_CONFIGS]
MAX_SPLITS = triton_pairs.MAX_SPLITS
FINALIZE_BLOCK = triton_pairs.FINALIZE_BLOCK
FINALIZE_WARPS = 4  # Triton's default, which the op's launch keeps

# Triton's type names for the tensors the op passes (inputs in any float dtype; outputs, scratch and
# the loss in the accumulation dtype: float64 for float64 input, else float32).
INPUT_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}
_INT_ARGS = {"s_stride_row", "t_stride_row", "rows", "C", "n_splits"}
_FLOAT_ARGS = {"k_hi", "k_lo", "exp2_scale_hi", "exp2_scale_lo", "ratio_limit"}
_INPUT_POINTERS = {"s_ptr", "t_ptr"}


def flag_sets() -> Iterator[Tuple[bool, bool, bool]]:
    """(hard, need_gs, need_gt) as the op passes them: a hard teacher never computes its gradient."""
    for hard, need_gs, need_gt in itertools.product((False, True), repeat=3):
        if not (hard and need_gt):
            yield hard, need_gs, need_gt


@dataclass
class KernelVariant:
    """One kernel the op can launch: the pair kernel or the finalize kernel, and its constants."""

    kernel: str  # "pairs" or "finalize"
    dtype: str  # the input dtype (finalize: the accumulation dtype), a key of INPUT_TYPES
    hard: bool
    need_gs: bool
    need_gt: bool
    fused: bool
    block: int
    num_warps: int
    # How the runtime specializes the other arguments, which it decides per call:
    int_type: str = "i32"  # "i64": an integer argument >= 2^31 (a long row, a strided view)
    aligned: bool = False  # every pointer 16-byte aligned, every integer a multiple of 16
    splits_pow2: int = 0  # the finalize kernel's SPLITS_POW2 (next power of 2 of the splits)

    def options(self) -> Dict[str, int]:
        return {"num_warps": self.num_warps, "num_stages": 1}

    def source(self):
        """The variant as a ``triton.compiler.ASTSource`` (Triton >= 3.3)."""
        from triton.compiler import ASTSource

        if INTERPRETING:
            raise RuntimeError("the Triton kernels compile only without TRITON_INTERPRET=1")
        acc = "fp64" if self.dtype == "float64" else "fp32"
        if self.kernel == "pairs":
            fn = triton_pairs._kendall_pairs_kernel
            constants = dict(HARD=self.hard, NEED_GS=self.need_gs, NEED_GT=self.need_gt,
                             FUSED_FINALIZE=self.fused, FAST_RCP=acc == "fp32", BLOCK=self.block)
        else:
            fn = triton_pairs._kendall_finalize_kernel
            constants = dict(NEED_GS=self.need_gs, NEED_GT=self.need_gt, SPLITS_POW2=self.splits_pow2,
                             BLOCK=self.block)
        signature: Dict[str, str] = {}
        divisible = []  # arguments the runtime marks tt.divisibility=16 (Triton's "D" specialization)
        for index, name in enumerate(fn.arg_names):
            if name in constants:
                signature[name] = "constexpr"
            elif name in _INPUT_POINTERS:
                signature[name] = "*" + INPUT_TYPES[self.dtype]
            elif name.endswith("_ptr"):
                signature[name] = "*" + acc
            elif name in _INT_ARGS:
                signature[name] = self.int_type
            elif name in _FLOAT_ARGS:
                signature[name] = "fp32"
            else:
                raise KeyError(f"triton_tools does not know argument {name!r} of {fn.__name__}")
            if self.aligned and (name.endswith("_ptr") or name in _INT_ARGS):
                divisible.append(index)
        constexprs = {(fn.arg_names.index(name),): value for name, value in constants.items()}
        attrs = {(index,): [["tt.divisibility", 16]] for index in divisible}
        return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def splits_per_row(rows: int, c: int, device: torch.device) -> int:
    """How many programs share each row of a (rows, C) call on ``device``."""
    return triton_pairs.num_splits(rows, c, device)


def autotuned_configs() -> Dict[Tuple, str]:
    """The autotuner's picks in this process so far: its key (C and the flags) -> 'BLOCK:WARPS'
    (empty under the interpreter, which does not tune)."""
    if INTERPRETING:
        return {}
    cache = triton_pairs.tuned_kernel().cache
    return {key: f"{config.kwargs['BLOCK']}:{config.num_warps}" for key, config in cache.items()}
