"""The spread limits that choose how a row's pairs are computed, for Python and Triton.

``csrc/pair_math.h`` holds the same numbers for the C++ kernels (``kSmallSpreadMax``,
``RatioLimits<T>::max_spread``); tests/test_shared_constants.py reads that header and fails when
the two differ. The forms themselves are described there and in ``triton_pair_math.py``.
"""

from __future__ import annotations

import torch

# Largest k * (max - min) of a row that takes the small-spread form: every expm1 weight then lies in
# [expm1(-1), expm1(1)], so 1 + e keeps its relative precision.
SMALL_SPREAD_MAX = 1.0

# Largest k * (max - min) of a row that the ratio form serves: every exp(+-k R) stays a normal number
# and a_i + a_j cannot overflow (float32: exp(87.3) is the smallest normal's reciprocal; float64:
# exp(708)). Keyed by the accumulation dtype.
RATIO_MAX_SPREAD = {torch.float32: 80.0, torch.float64: 700.0}
