"""The CPU kernels give the same bits as the build that made tests/golden/cpu_outputs.pt.

The file holds inputs and the outputs of the raw ops per CPU variant, with a fingerprint of where
each variant's outputs were made (tests/golden/make_golden.py). Bits depend on the compiler, glibc's
libm and the CPU as well as on the sources, so a variant is compared only where all of them match;
elsewhere it is skipped, with what differs. Regenerate the file only on purpose: it is the record
that a rebuild (the LibTorch stable-ABI port) must reproduce.
"""

from __future__ import annotations

import importlib.util
import os
from typing import List, Optional

import pytest
import torch

from rkkd_kernels import _ext

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN_FILE = os.path.join(HERE, "golden", "cpu_outputs.pt")

# make_golden.py is a script, not a package module: load it from its path.
_spec = importlib.util.spec_from_file_location("make_golden", os.path.join(HERE, "golden", "make_golden.py"))
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

DATA = golden.load(GOLDEN_FILE)
GROUPS = list(dict.fromkeys(case["group"] for case in DATA["cases"]))
# Every known variant, so that one the file lacks shows as a skip rather than not at all.
VARIANTS = list(dict.fromkeys([*golden.VARIANTS, *DATA["variants"]]))
OUTPUT_NAMES = ("loss", "grad_student", "grad_teacher")
INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def why_skip(variant: str) -> Optional[str]:
    if variant not in DATA["variants"]:
        return f"{os.path.basename(GOLDEN_FILE)} holds no outputs of {variant}"
    if hasattr(_ext, "supported_isas") and variant not in _ext.supported_isas():
        missing = ", ".join(_ext.missing_flags(variant)) if hasattr(_ext, "missing_flags") else "?"
        return f"this CPU cannot run {variant} (it lacks {missing})"
    here = golden.variants_here()
    if variant not in here:
        return f"this build has no {variant} variant that this CPU runs (it has {', '.join(here)})"
    stored, now = DATA["variants"][variant]["fingerprint"], golden.fingerprint()
    differs = [f"{key} {stored.get(key)!r} there, {now.get(key)!r} here"
               for key in sorted(set(stored) | set(now)) if stored.get(key) != now.get(key)]
    if differs:
        return f"{variant}'s golden outputs were made elsewhere: " + "; ".join(differs)
    return None


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns, so that NaN equals NaN of the same payload and -0.0 differs from 0.0."""
    return t.contiguous().view(INT_OF_SIZE[t.element_size()])


def mismatches(case: dict, got: List[torch.Tensor], want: List[torch.Tensor]) -> List[str]:
    rows = DATA["inputs"][case["input"]]["row_names"]
    found = []
    for name, g, w in zip(OUTPUT_NAMES, got, want):
        where = f"{case['name']} {name}"
        if g.dtype != w.dtype or g.shape != w.shape:
            found.append(f"{where}: {g.dtype} {tuple(g.shape)}, stored {w.dtype} {tuple(w.shape)}")
            continue
        differ = bits(g) != bits(w)
        if differ.any():
            first = tuple(differ.nonzero()[0].tolist())
            shown = [f"{x[first].item()!r} (0x{bits(x)[first].item() & (1 << 8 * x.element_size()) - 1:x})"
                     for x in (g, w)]
            found.append(f"{where}: {int(differ.sum())} of {w.numel()} elements differ; first at "
                         f"{first} (row {rows[first[0]]}): {shown[0]}, stored {shown[1]}")
    return found


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_same_bits_as_golden(variant, group):
    reason = why_skip(variant)
    if reason:
        pytest.skip(reason)
    picked = [i for i, case in enumerate(DATA["cases"]) if case["group"] == group]
    cases = [DATA["cases"][i] for i in picked]
    outputs = golden.compute(variant, cases, DATA["inputs"])
    stored = DATA["variants"][variant]["outputs"]
    found = [m for i, got in zip(picked, outputs) for m in mismatches(DATA["cases"][i], got, stored[i])]
    assert not found, f"{len(found)} outputs differ from the golden file:\n" + "\n".join(found[:20])

