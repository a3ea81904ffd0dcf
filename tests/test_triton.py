"""What is particular to the Triton backend (the shared suite in test_kendall.py covers the API).

The op ``rkkd::kendall_triton`` is called directly here, on CUDA tensors where there is a GPU and
under the Triton interpreter (CPU tensors) otherwise, and held to the float64 reference:
- tile edges: C around multiples of the tile width (masked diagonal and last tiles);
- the one-split-per-row path and the multi-split path (scratch rows, finalize kernel), including
  more splits than tile-rows;
- rows whose k * (max - min) takes the guarded direct form, next to rows on the ratio form;
- NaN / inf rows, the hard teacher, the need_grad flags, bitwise determinism, k's float64 bits,
  gradcheck and opcheck.

Tolerances, input maker and truth: tests/helpers.py, shared with the other kernel tests.

Interpreter shapes stay small (a tile costs ~10 ms there): the whole file takes about a minute.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import interpreted
from helpers import assert_matches, make_logits, truth
from rkkd_kernels import backends, kendall_loss, ops
from rkkd_kernels.dtypes import accumulation_dtype
from rkkd_kernels.row_paths import RATIO_MAX_SPREAD

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_WHY_NOT = backends.why_unavailable("triton", torch.device(DEVICE))
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=f"triton backend: {_WHY_NOT}")

if _WHY_NOT is None:
    from rkkd_kernels import triton_pairs as tk


def logits(shape, dtype=torch.float64, **kw):
    """This file's inputs live on DEVICE."""
    return make_logits(shape, dtype, device=DEVICE, **kw)


def run_op(s, t, k=1.0, hard=False, need_s=True, need_t=True):
    return torch.ops.rkkd.kendall_triton(s, t, float(k), hard, need_s, need_t)


def assert_close_to_reference(out, s, t, k=1.0, hard=False):
    """The op's outputs, in the accumulation dtype, against the float64 truth; a hard teacher's
    gradient is exactly zero."""
    acc = accumulation_dtype(s.dtype)
    assert all(x.dtype == acc for x in out)
    assert_matches(out, truth(s, t, k=k, hard_teacher=hard), acc, k)
    if hard:
        assert (out[2] == 0).all()


@pytest.fixture
def splits(monkeypatch):
    """Force the number of programs per row (the op looks num_splits up at every call)."""

    def force(n):
        monkeypatch.setattr(tk, "num_splits", lambda rows, c, device: n)

    return force


# ---------------------------------------------------------------------------------------------
# Registration


def test_op_registered_with_the_shared_schema_and_autograd():
    schema = torch.ops.rkkd.kendall_triton.default._schema
    assert str(schema) == "rkkd::kendall_triton" + ops.SCHEMA
    # The shared autograd: the backward scales the gradients the forward wrote.
    s = logits((3, 9), seed=1).requires_grad_(True)
    t = logits((3, 9), seed=2).requires_grad_(True)
    loss, gs, gt = run_op(s, t, 1.5)
    weights = torch.tensor([0.5, -2.0, 3.0], dtype=torch.float64, device=DEVICE)
    ds, dt = torch.autograd.grad((loss * weights).sum(), (s, t))
    torch.testing.assert_close(ds, weights[:, None] * gs, atol=0, rtol=0)
    torch.testing.assert_close(dt, weights[:, None] * gt, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize(
    "hard,need", [(False, (True, True)), (False, (True, False)), (True, (True, True)), (False, (False, False))]
)
def test_opcheck(dtype, hard, need):
    s = logits((3, 7), dtype, seed=3)
    t = logits((3, 7), dtype, seed=4)
    torch.library.opcheck(torch.ops.rkkd.kendall_triton.default, (s, t, 1.5, hard, *need))


def test_bad_calls_of_the_op_raise():
    s = logits((2, 5))
    for args in [
        (s, s[:, :4]),
        (s[:, :1], s[:, :1]),
        (s[0], s[0]),
        (s, s.float()),
    ]:
        with pytest.raises(RuntimeError, match="kendall_triton"):
            run_op(*args)
    for k in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(RuntimeError, match="kendall_triton: k must be a positive finite number"):
            run_op(s, s, k)


# ---------------------------------------------------------------------------------------------
# Shapes, tiles and splits

# Around multiples of 16 (the interpreter's tile for C <= 160) and of 32 and 64 (the GPU's tiles),
# plus the smallest rows and the interpreter's wider tiles (64 from C = 161, 128 from C = 513).
TILE_EDGE_C = [2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 129, 161, 200, 513]


@pytest.mark.parametrize("c", TILE_EDGE_C)
def test_tile_edges(c):
    rows = 2 if c > 160 else 3
    s = logits((rows, c), seed=c)
    t = logits((rows, c), seed=c + 1)
    assert_close_to_reference(run_op(s, t, 0.7), s, t, 0.7)


@pytest.mark.parametrize("n_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_any_number_of_splits(splits, n_splits, dtype, hard):
    """The fused path (1 split) and the split + finalize path, also with more splits than tiles.

    C = 40 has three 16-wide tiles under the interpreter (and one or two on a GPU): 5 splits leave
    some programs without a tile-row, whose zero partial rows must still add up right.
    """
    splits(n_splits)
    s = logits((3, 40), dtype, seed=5)
    t = logits((3, 40), dtype, seed=6)
    assert_close_to_reference(run_op(s, t, 1.3, hard), s, t, 1.3, hard)


def test_num_splits_policy():
    device = torch.device(DEVICE)
    wanted = tk._programs_wanted(device)
    # Many rows: one program per row, the partial row is the output (no scratch).
    assert tk.num_splits(10 * wanted, 10_000, device) == 1
    # Few rows: more programs per row, never more than MAX_SPLITS or C allows.
    assert tk.num_splits(1, 10**6, device) == min(tk.MAX_SPLITS, wanted)
    assert tk.num_splits(1, 2, device) == 1
    for rows in (1, 2, 3, 7, wanted - 1, wanted, wanted + 1):
        n = tk.num_splits(rows, 10**6, device)
        assert 1 <= n <= tk.MAX_SPLITS
        assert (n - 1) * rows < wanted  # the scratch stays under one row per SM


def test_strided_rows_and_columns():
    base_s = logits((4, 50), seed=7)
    base_t = logits((50, 4), seed=8)
    s = base_s[::2, 5:45]  # strided rows, dense columns
    t = base_t.t()[1:3, 5:45]  # strided columns
    assert not s.is_contiguous() and t.stride(1) != 1
    got = run_op(s, t)
    want = run_op(s.contiguous(), t.contiguous())
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert_close_to_reference(got, s, t)


def test_need_grad_flags():
    s = logits((2, 12), seed=9)
    t = logits((2, 12), seed=10)
    full = run_op(s, t)
    for need_s, need_t in [(True, False), (False, True), (False, False)]:
        loss, gs, gt = run_op(s, t, need_s=need_s, need_t=need_t)
        assert torch.equal(loss, full[0])
        assert gs.shape == ((2, 12) if need_s else (0,)) and gt.shape == ((2, 12) if need_t else (0,))
        if need_s:
            assert torch.equal(gs, full[1])
        if need_t:
            assert torch.equal(gt, full[2])


def test_rows_zero():
    s = torch.zeros((0, 6), device=DEVICE)
    loss, gs, gt = run_op(s, s)
    assert loss.shape == (0,) and gs.shape == (0, 6) and gt.shape == (0, 6)


# ---------------------------------------------------------------------------------------------
# Configurations: each of the autotuner's candidates, the autotuner itself, the pin


def _config_id(config):
    return f"block{config.kwargs['BLOCK']}-warps{config.num_warps}"


@pytest.mark.parametrize("config", tk.GPU_CONFIGS if _WHY_NOT is None else [], ids=_config_id)
@pytest.mark.parametrize("n_splits", [1, 3])
def test_every_config_matches_reference(monkeypatch, splits, config, n_splits):
    """Each candidate the autotuner may pick gives the right answer (on a GPU the suite runs with
    one pinned configuration; under the interpreter only the tile width matters)."""
    monkeypatch.setattr(tk, "pinned_config", config)
    splits(n_splits)
    for c in (33, 100, 200):
        s = logits((2, c), torch.float32, seed=c + 30)
        t = logits((2, c), torch.float32, seed=c + 31)
        assert_close_to_reference(run_op(s, t, 0.9), s, t, 0.9)


def test_autotuned_kernel_matches_reference(monkeypatch):
    if interpreted("triton", DEVICE):
        pytest.skip("the interpreter never autotunes (it runs one tile width per C)")
    monkeypatch.setattr(tk, "pinned_config", None)
    s = logits((4, 300), torch.float32, seed=40)
    t = logits((4, 300), torch.float32, seed=41)
    assert_close_to_reference(run_op(s, t, 1.1), s, t, 1.1)
    assert len(tk.tuned_kernel().cache) > 0  # the autotuner ran and chose


def test_parse_config():
    config = tk.parse_config("32:4")
    assert config.kwargs["BLOCK"] == 32 and config.num_warps == 4 and config in tk.GPU_CONFIGS
    with pytest.raises(ValueError, match="BLOCK:WARPS"):
        tk.parse_config("64")
    with pytest.raises(ValueError, match="not one of the kernel's configurations"):
        tk.parse_config("128:8")


# ---------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("n_splits", [1, 2])
def test_large_spread_rows_next_to_ordinary_ones(splits, dtype, hard, n_splits):
    """k * (max - min) past the ratio form's limit (80 in float32, 700 in float64) takes the direct
    form, row by row: ordinary rows, rows just under and over the limit, and far beyond it."""
    splits(n_splits)
    k = 2.0
    limit = RATIO_MAX_SPREAD[dtype]
    c = 37
    unit = logits((1, c), seed=11, scale=1.0)
    unit = (unit - unit.min()) / (unit.max() - unit.min())  # spread exactly 1
    spreads = [3.0, 0.99 * limit / k, 1.01 * limit / k, 50 * limit / k]
    s = torch.cat([unit.roll(i, -1) * w + 7.0 * i for i, w in enumerate(spreads)])
    t = torch.cat([unit.roll(-2 * i, -1) * w - 3.0 for i, w in enumerate(spreads)])
    s, t = s.to(dtype), t.to(dtype)
    assert_close_to_reference(run_op(s, t, k, hard), s, t, k, hard)


# The interpreter's numpy warns where x_i - x_j overflows to -inf: by design, tanh is then -1.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_logits_near_the_float32_limit():
    """(max + min) / 2 must not overflow; max - min may (that row takes the direct form)."""
    s = torch.tensor([[3.0e38, 2.9e38, 3.1e38, 2.95e38], [-3.0e38, 3.0e38, 0.0, 1.0]], device=DEVICE)
    t = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 1.0, 2.0]], device=DEVICE)
    loss, gs, gt = run_op(s, t, 1.0)
    assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all()
    assert_close_to_reference((loss, gs, gt), s, t)


def test_k_keeps_its_float64_bits():
    """k is passed to the kernel as two float32 halves: 0.3 must not become float32(0.3)."""
    s = logits((2, 20), seed=12)
    t = logits((2, 20), seed=13)
    k = 0.3
    assert_close_to_reference(run_op(s, t, k), s, t, k)
    # float32(0.3) differs from 0.3 by 1e-8 relative, which moves the loss by far more than 1e-12.
    coarse = truth(s, t, k=float(torch.tensor(k, dtype=torch.float32)))[0]
    assert (coarse - truth(s, t, k=k)[0]).abs().max() > 1e-11


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_compute_in_float32(half):
    s = logits((3, 21), torch.float32, seed=14).to(half)
    t = logits((3, 21), torch.float32, seed=15).to(half)
    got = run_op(s, t)
    want = run_op(s.float(), t.float())
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)  # the same float32 values in, the same kernel: bitwise


def test_hard_teacher_ties_and_zero_teacher_gradient():
    g = torch.Generator().manual_seed(16)
    s = logits((3, 19), seed=17)
    t = torch.randint(0, 3, (3, 19), generator=g).double().to(DEVICE)  # many ties: sign(0) = 0
    loss, gs, gt = run_op(s, t, 1.0, True)
    assert torch.equal(gt, torch.zeros_like(gt))
    assert_close_to_reference((loss, gs, gt), s, t, 1.0, True)


@pytest.mark.parametrize("n_splits", [1, 3])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_rows(splits, n_splits, hard, bad):
    splits(n_splits)
    s = logits((4, 33), seed=18)
    t = logits((4, 33), seed=19)
    s[1, 5] = bad
    t[2, 32] = bad  # the last lane of the last, partial tile
    s[3, :] = bad  # a row with nothing finite at all
    loss, gs, gt = run_op(s, t, 1.0, hard)
    for r in (1, 2, 3):
        assert torch.isnan(loss[r]) and torch.isnan(gs[r]).all()
        if hard:
            assert (gt[r] == 0).all()
        else:
            assert torch.isnan(gt[r]).all()
    clean = (slice(0, 1), slice(None))
    assert_close_to_reference((loss[:1], gs[clean], gt[clean]), s[clean], t[clean], 1.0, hard)


@pytest.mark.parametrize("n_splits", [1, 3])
def test_deterministic_bitwise(splits, n_splits):
    splits(n_splits)
    s = logits((3, 70), torch.float32, seed=20)
    t = logits((3, 70), torch.float32, seed=21)
    first = run_op(s, t, 1.0)
    for _ in range(2):
        for a, b in zip(first, run_op(s, t, 1.0)):
            assert torch.equal(a, b)


@pytest.mark.parametrize(
    "shape,k,hard,n_splits",
    [((2, 5), 1.3, False, 1), ((1, 20), 0.6, False, 2), ((2, 7), 1.0, True, 1), ((2, 6), 30.0, False, 1)],
    ids=["small", "split", "hard", "direct-form"],
)
def test_gradcheck_through_the_backend(splits, shape, k, hard, n_splits):
    """float64 gradcheck through kendall_loss(backend="triton"); k = 30 with logits of spread ~50
    puts k * spread past 700, so that case checks the direct form's gradients."""
    splits(n_splits)
    scale = 20.0 if k == 30.0 else 1.0
    s = logits(shape, seed=22, scale=scale).requires_grad_(True)
    t = logits(shape, seed=23, scale=scale).requires_grad_(not hard)
    if k == 30.0:
        assert k * (s.max() - s.min()) > RATIO_MAX_SPREAD[torch.float64]

    def fn(s, t):
        return kendall_loss(s, t, k, hard_teacher=hard, reduction="none", backend="triton")

    assert torch.autograd.gradcheck(fn, (s, t))


def test_interpreter_runs_the_small_tiles():
    """Guards the premise of the tile-edge tests under the interpreter: small C spans many tiles."""
    if not interpreted("triton", DEVICE):
        pytest.skip("GPU: tile widths come from the autotuner or the pinned configuration")
    assert tk.interpreter_block(33) == 16 and tk.interpreter_block(161) == 64
    assert tk.interpreter_block(513) == 128
