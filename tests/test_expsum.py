"""The exponential-sum method of the hard-teacher loss (rkkd_kernels/expsum.py): accuracy against the
float64 truth, the lattice's error bounds, ties, the pair-kernel fallback, NaN rows, determinism,
gradcheck, top_k, torch.compile, the method keyword and the cost model of method="auto".

The Triton kernel joins at small C (the interpreter is slow) without a GPU. Tolerances are the
contract's per-row precision (tests/helpers.py, ROW_*): float32 loss within 1e-6 of the float64
truth and the student's gradient within 1e-5 of the row's largest |gradient|; float64 1e-12 and
1e-10.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import helpers
from rkkd_kernels import KendallLoss, backends, expsum, kendall_loss



def loss_and_grads(s, t, k, method, backend="cpu", **kw):
    """Per-row loss and the gradients of its sum (the teacher requires grad too: it must get 0)."""
    return helpers.loss_and_grads(s, t, backend, k=k, hard_teacher=True, method=method, **kw)


def truth(s, t, k, **kw):
    """float64 truth: the float64 pair kernel (checked against the reference by test_kendall.py),
    whose (1 - tanh^2) / 4 = p q keeps its relative precision where tanh saturates (the reference's
    1 - tanh^2 does not: at k |s_i - s_j| = 16 it is off by 1e-3 relative); the loss also against
    the reference itself where C x C fits."""
    s, t = s.double(), t.double()
    out = loss_and_grads(s, t, k, "pairs", backend="cpu", **kw)
    if s.shape[-1] <= 2000:
        ref_loss = loss_and_grads(s, t, k, "pairs", backend="reference", **kw)[0]
        torch.testing.assert_close(out[0], ref_loss, atol=1e-13, rtol=0)
    return out


def assert_close_to_truth(got, want, dtype):
    loss, gs, gt = got
    helpers.assert_row_precise((loss, gs, None), want, dtype)
    assert (gt == 0).all()  # a hard teacher gets no gradient


def logits(shape, seed, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def mixed_rows(c, seed, dtype, scale=1.0):
    """Rows of one batch: independent, tied teacher values, a student close to the teacher, a
    student equal to the teacher (their gradients cancel most), a constant teacher (all tied)."""
    s = logits((5, c), seed, scale)
    t = logits((5, c), seed + 1, scale)
    g = torch.Generator().manual_seed(seed + 2)
    t[1] = torch.randint(0, 4, (c,), generator=g).double()
    s[2] = t[2] + 0.01 * scale * torch.randn(c, generator=g, dtype=torch.float64)
    s[3] = t[3]
    t[4] = 0.5
    return s.to(dtype), t.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c", [2, 3, 17, 100, 1000, 2000])
@pytest.mark.parametrize("k", [0.25, 1.0, 8.0])
def test_matches_reference(dtype, c, k):
    s, t = mixed_rows(c, seed=c, dtype=dtype)
    assert_close_to_truth(loss_and_grads(s, t, k, "expsum"), truth(s, t, k), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("spread", [20.0, 60.0, 79.5, 85.0, 400.0])
def test_large_spread_and_the_pair_fallback(dtype, spread):
    """k * R up to float32's limit of the method (80) by exponential sums; beyond it the row goes
    to the pair kernel inside the op (float32: 85 and 400; float64 serves up to 700)."""
    c, k = 300, 1.0
    s = torch.rand((3, c), generator=torch.Generator().manual_seed(5), dtype=torch.float64) * spread
    s[:, 0], s[:, 1] = 0.0, spread  # the row's spread is exactly `spread`
    t = logits((3, c), 6)
    t[2] = torch.randint(0, 5, (c,), generator=torch.Generator().manual_seed(7)).double()
    s, t = s.to(dtype), t.to(dtype)
    assert_close_to_truth(loss_and_grads(s, t, k, "expsum"), truth(s, t, k), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_long_rows_against_the_float64_pair_kernel(dtype):
    """C = 32,000 (too big for the reference): the float64 pair kernel is the oracle."""
    c = 32000
    s = logits((1, c), 40, dtype=dtype)
    t = logits((1, c), 41)
    t = torch.round(t * 50).to(dtype)  # about 400 distinct values: long tie groups
    assert_close_to_truth(loss_and_grads(s, t, 1.0, "expsum"), truth(s, t, 1.0), dtype)


def test_ties_exclude_the_whole_group():
    """Few teacher values (large tie groups): an exclusive prefix that kept a group's own earlier
    members would be off by about 1e-3; the loss must equal the truth to float64 precision."""
    c = 500
    s = logits((4, c), 8)
    t = torch.randint(0, 3, (4, c), generator=torch.Generator().manual_seed(9)).double()
    t[3] = (torch.arange(c) >= c - 1).double()  # one-hot teacher: one pair group
    assert_close_to_truth(loss_and_grads(s, t, 1.5, "expsum"), truth(s, t, 1.5), torch.float64)


def test_half_types_compute_in_float32():
    s = logits((3, 200), 10, dtype=torch.float32)
    t = logits((3, 200), 11, dtype=torch.float32)
    for half in (torch.float16, torch.bfloat16):
        got = loss_and_grads(s.to(half), t.to(half), 1.0, "expsum")
        want = loss_and_grads(s.to(half).float(), t.to(half).float(), 1.0, "expsum")
        assert all(g.dtype == half for g in got)
        torch.testing.assert_close(got[0].float(), want[0], rtol=2**-7, atol=0)


# ------------------------------------------------------------------------------------------------
# The lattice: the error bounds of expsum.py hold, and the C++ kernel uses the same lattice.


def numpy_expsum_row(s: np.ndarray, t: np.ndarray, k: float, lat: expsum.Lattice):
    """The method written out in float64 NumPy (M x C arrays): the loss of one row."""
    c = len(s)
    order = np.argsort(-t, kind="stable")
    ts, ss = t[order], s[order]
    centre = 0.5 * (s.max() + s.min())
    m_lo, m_hi = lat.node_range(k * (s.max() - s.min()))
    y = np.exp(np.arange(m_lo, m_hi + 1)[:, None] * lat.step + 2 * k * (ss - centre)[None, :])
    e, f = np.exp(-y), y * np.exp(-y)
    starts = np.r_[True, ts[1:] != ts[:-1]]
    group = np.cumsum(starts) - 1
    sizes = np.bincount(group)
    tied = int((sizes * (sizes - 1) // 2).sum())
    group_e = np.zeros((y.shape[0], len(sizes)))
    np.add.at(group_e.T, group, e.T)
    before = np.concatenate([np.zeros((y.shape[0], 1)), np.cumsum(group_e, 1)[:, :-1]], 1)
    f_pref_e = (f * before[:, group]).sum()
    return (tied + 2 * lat.step * f_pref_e) / (c * (c - 1) / 2)


def test_cpp_kernel_uses_the_python_lattice():
    """A different step, cut or node range in csrc/expsum.h would move the float64 loss by far more
    than float64 rounding (the approximation's error is 1e-14, not 1e-16)."""
    lat = expsum.LATTICES[torch.float64]
    for seed, (c, k, scale) in enumerate([(50, 1.0, 1.0), (200, 3.0, 2.0), (300, 0.5, 10.0)]):
        s, t = logits((1, c), seed, scale), logits((1, c), seed + 100, scale)
        t = torch.round(t)
        want = numpy_expsum_row(s[0].numpy(), t[0].numpy(), k, lat)
        got = kendall_loss(s, t, k, hard_teacher=True, reduction="none", method="expsum")
        assert abs(got.item() - want) < 2e-15


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_trapezoid_error_bounds(dtype):
    """The lattice's sums of 1/x and 1/x^2 stay within the documented bound plus both cuts, on the
    whole range of a row at k R = 10 (and the bound is small enough for the contract)."""
    lat = expsum.LATTICES[dtype]
    spread = 10.0
    m_lo, m_hi = lat.node_range(spread)
    u = np.exp(np.arange(m_lo, m_hi + 1) * lat.step)
    x = 2 * np.exp(np.linspace(-spread, spread, 4001))
    y = u[None, :] * x[:, None]
    inv_x = lat.step * (y * np.exp(-y)).sum(1)  # approximates x * (1/x) = 1
    inv_x2 = lat.step * (y * y * np.exp(-y)).sum(1)  # approximates x^2 * (1/x^2) = 1
    assert np.abs(inv_x - 1).max() <= lat.discretisation_error(1) + 2 * lat.cut
    assert np.abs(inv_x2 - 1).max() <= lat.discretisation_error(2) + 2 * lat.cut
    limit = {torch.float32: 1e-7, torch.float64: 1e-12}[dtype]
    assert lat.discretisation_error(2) < limit


def test_node_count_grows_linearly_with_spread():
    lat = expsum.LATTICES[torch.float32]
    counts = [lat.nodes(s) for s in (8.5, 20.0, 80.0)]
    assert counts == [89, 141, 416]
    assert lat.node_range(0.0)[0] < 0 < lat.node_range(0.0)[1]


# ------------------------------------------------------------------------------------------------
# Behaviour shared with every method.


def test_non_finite_rows_are_nan():
    s = logits((4, 50), 12)
    t = logits((4, 50), 13)
    s[1, 3] = math.nan
    t[2, 7] = math.inf
    s[3, 0] = -math.inf
    loss, gs, gt = loss_and_grads(s, t, 1.0, "expsum")
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()
    assert torch.isfinite(gs[0]).all() and torch.isnan(gs[1:]).all()
    assert (gt == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_deterministic_across_runs_threads_and_batches(dtype):
    s, t = mixed_rows(3000, seed=14, dtype=dtype)
    first = loss_and_grads(s, t, 1.0, "expsum")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = loss_and_grads(s, t, 1.0, "expsum")
        alone = loss_and_grads(s[2:3], t[2:3], 1.0, "expsum")
    finally:
        torch.set_num_threads(threads)
    again = loss_and_grads(s, t, 1.0, "expsum")
    for a, b, c in zip(first, serial, again):
        assert torch.equal(a, b) and torch.equal(a, c)
    for a, b in zip(first, alone):
        assert torch.equal(a[2:3], b)


@pytest.mark.parametrize("shape,top_k", [((2, 6), None), ((3, 2, 9), None), ((2, 12), 5)])
def test_gradcheck_float64(shape, top_k):
    s = logits(shape, 15).requires_grad_(True)
    t = logits(shape, 16)

    def fn(s):
        return kendall_loss(s, t, 1.3, hard_teacher=True, top_k=top_k, reduction="none", method="expsum")

    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("top_k", [2, 7, 40])
def test_top_k_composes(top_k):
    """The op sees the K kept columns; the others get zero gradient."""
    s = logits((3, 40), 17)
    t = logits((3, 40), 18)
    got = loss_and_grads(s, t, 1.0, "expsum", top_k=top_k)
    want = loss_and_grads(s, t, 1.0, "pairs", backend="reference", top_k=top_k)
    assert_close_to_truth(got, want, torch.float64)
    index = t.topk(top_k, dim=-1).indices
    outside = torch.ones_like(s, dtype=torch.bool).scatter(-1, index, False)
    assert (got[1][outside] == 0).all()


def test_no_gradient_asked_for():
    s = logits((2, 30), 19)
    t = logits((2, 30), 20)
    with torch.no_grad():
        out = kendall_loss(s, t, hard_teacher=True, reduction="none", method="expsum")
    assert out.grad_fn is None
    want = kendall_loss(s, t, hard_teacher=True, reduction="none", backend="reference")
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


def test_empty_batch():
    s = torch.zeros((0, 5), requires_grad=True)
    out = kendall_loss(s, torch.zeros((0, 5)), hard_teacher=True, reduction="sum", method="expsum")
    out.backward()
    assert out.item() == 0 and s.grad.shape == (0, 5)


@pytest.mark.parametrize("need", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(dtype, need):
    s = logits((3, 7), 21, dtype=dtype)
    t = logits((3, 7), 22, dtype=dtype)
    torch.library.opcheck(torch.ops.rkkd.kendall_expsum.default, (s, t, 1.5, True, *need))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def forward(s, t):
        return kendall_loss(s, t, 2.0, hard_teacher=True, top_k=6, method="expsum")

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    s = logits((4, 12), 23, dtype=torch.float32)
    t = logits((4, 12), 24, dtype=torch.float32)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    eager = forward(s1, t)
    eager.backward()
    got = compiled(s2, t)
    got.backward()
    torch.testing.assert_close(got, eager, atol=0, rtol=0)
    torch.testing.assert_close(s2.grad, s1.grad, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# The method keyword and the cost model.


def test_method_errors():
    s, t = logits((2, 8), 25), logits((2, 8), 26)
    with pytest.raises(ValueError, match="hard_teacher=True"):
        kendall_loss(s, t, method="expsum")
    with pytest.raises(ValueError, match="hard_teacher=True"):
        KendallLoss(method="expsum")
    with pytest.raises(ValueError, match="unknown method"):
        kendall_loss(s, t, hard_teacher=True, method="fast")
    with pytest.raises(ValueError, match="backends"):
        kendall_loss(s, t, hard_teacher=True, method="expsum", backend="reference")
    assert expsum.EXPSUM_BACKENDS == ("cpu", "triton")
    # A soft teacher with "auto" or "pairs" is fine: the pair kernel.
    kendall_loss(s, t, method="auto")
    kendall_loss(s, t, method="pairs")


def test_module_passes_the_method():
    s, t = logits((2, 30), 27), logits((2, 30), 28)
    crit = KendallLoss(hard_teacher=True, method="expsum", reduction="none")
    assert "method='expsum'" in repr(crit)
    torch.testing.assert_close(crit(s, t), kendall_loss(s, t, hard_teacher=True, reduction="none", method="expsum"), atol=0, rtol=0)


def test_auto_follows_the_cost_model_on_the_host():
    """The choice takes C, k and the dtype, never a tensor; small rows keep the pair kernel, long
    ones take the exponential sums, and the crossover moves up with k (more nodes)."""
    choose = expsum.choose
    assert choose("auto", "cpu", 100, 1.0, torch.float32, True) == "pairs"
    assert choose("auto", "cpu", 32000, 1.0, torch.float32, True) == "expsum"
    assert choose("auto", "cpu", 32000, 1.0, torch.float32, False) == "pairs"
    assert choose("auto", "cuda", 32000, 1.0, torch.float32, True) == "pairs"
    assert choose("pairs", "cpu", 32000, 1.0, torch.float32, True) == "pairs"
    assert choose("expsum", "cpu", 3, 1.0, torch.float32, True) == "expsum"

    def crossover(k):
        return next(c for c in range(2, 100000, 10) if expsum.expsum_is_cheaper("cpu", c, k, torch.float32))

    assert crossover(0.25) < crossover(1.0) < crossover(4.0)


# ------------------------------------------------------------------------------------------------
# The Triton kernel (under the interpreter without a GPU: small C).

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    backends.why_unavailable("triton", torch.device(TRITON_DEVICE)) is not None,
    reason=str(backends.why_unavailable("triton", torch.device(TRITON_DEVICE))),
)


def on_triton(*tensors):
    return [x.to(TRITON_DEVICE) for x in tensors]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c", [2, 3, 40, 150])
def test_triton_matches_reference(dtype, c):
    s, t = mixed_rows(c, seed=c + 7, dtype=dtype)
    got = [x.cpu() for x in loss_and_grads(*on_triton(s, t), 1.3, "expsum", backend="triton")]
    assert_close_to_truth(got, truth(s, t, 1.3), dtype)


@needs_triton
def test_triton_pair_fallback_nan_rows_and_top_k():
    c = 60
    s = torch.rand((4, c), generator=torch.Generator().manual_seed(30), dtype=torch.float64) * 90.0
    t = logits((4, c), 31)
    s[1] = logits((c,), 32)
    s[2, 5] = math.nan
    s32, t32 = s.float(), t.float()  # row 0 spreads about 90 > 80: the pair path in float32
    got = [x.cpu() for x in loss_and_grads(*on_triton(s32, t32), 1.0, "expsum", backend="triton")]
    assert torch.isnan(got[0][2]) and torch.isnan(got[1][2]).all()
    keep = [0, 1, 3]
    want = truth(s32[keep], t32[keep], 1.0)
    assert_close_to_truth([got[0][keep], got[1][keep], got[2][keep]], want, torch.float32)
    got_k = [x.cpu() for x in loss_and_grads(*on_triton(s[[1]], t[[1]]), 1.0, "expsum", backend="triton", top_k=9)]
    assert_close_to_truth(got_k, truth(s[[1]], t[[1]], 1.0, top_k=9), torch.float64)


@needs_triton
def test_triton_gradcheck_and_determinism():
    s = logits((2, 7), 33).to(TRITON_DEVICE).requires_grad_(True)
    t = logits((2, 7), 34).to(TRITON_DEVICE)

    def fn(s):
        return kendall_loss(s, t, 1.3, hard_teacher=True, reduction="none", backend="triton", method="expsum")

    assert torch.autograd.gradcheck(fn, (s,))
    a = loss_and_grads(s, t, 1.3, "expsum", backend="triton")
    b = loss_and_grads(s, t, 1.3, "expsum", backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_auto_keeps_the_pair_kernel_on_unmeasured_backends():
    assert expsum.choose("auto", "triton", 100000, 1.0, torch.float32, True) == "pairs"
    assert expsum.choose("expsum", "triton", 100, 1.0, torch.float32, True) == "expsum"
