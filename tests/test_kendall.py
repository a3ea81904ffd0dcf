"""The shared suite: every fast backend against the float64 reference, gradcheck, half types,
invariances, bad input, NaN rows, torch.compile and determinism. The tolerances and why they are
what they are: tests/helpers.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import backend_params, interpreted
from helpers import GRAD_RTOL, LOSS_ATOL, assert_matches, loss_and_grads, make_logits, truth
from rkkd_kernels import KendallLoss, backends, kendall_loss

BACKENDS = backend_params()


# Every combination of C, k and teacher kind (soft/hard).
CASES = [(c, k, hard) for c in (2, 3, 17, 100, 1000, 1023) for k in (0.25, 1.0, 8.0) for hard in (False, True)]


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c,k,hard", CASES, ids=[f"C{c}-k{k}-{'hard' if h else 'soft'}" for c, k, h in CASES])
def test_matches_reference(backend_device, dtype, c, k, hard):
    backend, device = backend_device
    rows = 2 if c >= 1000 else 5
    s = make_logits((rows, c), dtype, seed=c, device=device)
    t = make_logits((rows, c), dtype, seed=c + 1, device=device)
    assert_matches(loss_and_grads(s, t, backend, k=k, hard_teacher=hard), truth(s, t, k=k, hard_teacher=hard), dtype, k)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "scale,k",
    [(100.0, 1.0), (100.0, 8.0), (30.0, 2.0), (1e-4, 1.0)],
    ids=["mag100-k1", "mag100-k8", "mid-spread", "tiny-spread"],
)
def test_extreme_magnitudes(backend_device, dtype, scale, k):
    """Large k * spread takes the guarded paths; a tiny spread must not lose the small tanh."""
    backend, device = backend_device
    s = make_logits((3, 37), dtype, scale=scale, seed=1, device=device) + 100.0
    t = make_logits((3, 37), dtype, scale=scale, seed=2, device=device) - 100.0
    for hard in (False, True):
        assert_matches(loss_and_grads(s, t, backend, k=k, hard_teacher=hard), truth(s, t, k=k, hard_teacher=hard), dtype, k)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_leading_dims_and_strides(backend_device):
    backend, device = backend_device
    c = 19
    base_s = make_logits((c, 3, 2, 2), seed=3, device=device)
    base_t = make_logits((3, 2, c), seed=4, device=device)
    s = base_s[..., 0].permute(1, 2, 0)  # (3, 2, C), non-contiguous
    t = base_t
    assert not s.is_contiguous()
    loss, gs, gt = loss_and_grads(s, t, backend)
    assert loss.shape == (3, 2) and gs.shape == s.shape and gt.shape == t.shape
    expected = truth(s.reshape(-1, c), t.reshape(-1, c))
    assert_matches((loss.reshape(-1), gs.reshape(-1, c), gt.reshape(-1, c)), expected, torch.float64)

    # A broadcast (zero-stride) teacher: every row the same.
    t_row = make_logits((c,), seed=5, device=device)
    t_expanded = t_row.expand(6, c)
    s2 = s.reshape(6, c)
    out = kendall_loss(s2, t_expanded, backend=backend, reduction="none")
    want = kendall_loss(s2, t_expanded.contiguous(), backend="reference", reduction="none")
    torch.testing.assert_close(out.cpu(), want.cpu(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("top_k", [2, 5, 20])
@pytest.mark.parametrize("hard", [False, True])
def test_top_k(backend_device, top_k, hard):
    backend, device = backend_device
    s = make_logits((4, 20), seed=6, device=device)
    t = make_logits((4, 20), seed=7, device=device)
    loss, gs, gt = loss_and_grads(s, t, backend, top_k=top_k, hard_teacher=hard)

    # Independent of loss.py: pick the channels by hand and run the reference on them alone.
    index = t.cpu().topk(top_k, dim=-1).indices
    s_k = s.cpu().gather(-1, index).requires_grad_(True)
    t_k = t.cpu().gather(-1, index).requires_grad_(True)
    want = kendall_loss(s_k, t_k, hard_teacher=hard, backend="reference", reduction="none")
    want_gs_k, want_gt_k = torch.autograd.grad(want.sum(), (s_k, t_k))
    want_gs = torch.zeros_like(s.cpu()).scatter(-1, index, want_gs_k)
    want_gt = torch.zeros_like(t.cpu()).scatter(-1, index, want_gt_k)
    assert_matches((loss, gs, gt), (want.detach(), want_gs, want_gt), torch.float64)
    outside = torch.ones_like(gs.cpu(), dtype=torch.bool).scatter(-1, index, False)
    assert (gs.cpu()[outside] == 0).all() and (gt.cpu()[outside] == 0).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_ties_and_constant_rows(backend_device):
    backend, device = backend_device
    c = 23
    g = torch.Generator().manual_seed(8)
    ties_s = torch.randint(0, 4, (3, c), generator=g).double()
    ties_t = torch.randint(0, 3, (3, c), generator=g).double()
    constant = torch.full((2, c), 1.5, dtype=torch.float64)
    varied = make_logits((2, c), seed=9)
    s = torch.cat([ties_s, constant, varied]).to(device)
    t = torch.cat([ties_t, varied, constant]).to(device)
    for hard in (False, True):
        got = loss_and_grads(s, t, backend, hard_teacher=hard)
        assert_matches(got, truth(s, t, hard_teacher=hard), torch.float64)
        # A constant student or teacher row has tau = 0 exactly.
        torch.testing.assert_close(got[0][3:].cpu(), torch.ones(4, dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("shape,hard,top_k", [((2, 5), False, None), ((3, 2, 4), True, None), ((2, 9), False, 4)])
def test_gradcheck(backend_device, shape, hard, top_k):
    backend, device = backend_device
    s = make_logits(shape, seed=10, scale=1.0, device=device).requires_grad_(True)
    t = make_logits(shape, seed=11, scale=1.0, device=device).requires_grad_(not hard)

    def fn(s, t):
        return kendall_loss(s, t, 1.3, hard_teacher=hard, top_k=top_k, reduction="none", backend=backend)

    assert torch.autograd.gradcheck(fn, (s, t))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("half,bits", [(torch.float16, 11), (torch.bfloat16, 8)], ids=["f16", "bf16"])
def test_half_types(backend_device, half, bits):
    """Half inputs are computed in float32 and only the results are rounded to the half type.

    So against the float32 run on the same (already rounded) values, loss and gradients may differ
    by the rounding of a float32 number to `bits` significant bits: a relative 2^-bits. Gradients of
    float16 can also fall below its smallest normal (6.1e-5), where the spacing is 2^-24 absolute.
    """
    backend, device = backend_device
    c = 33
    s = make_logits((4, c), torch.float32, seed=12, device=device).to(half)
    t = make_logits((4, c), torch.float32, seed=13, device=device).to(half)
    got = loss_and_grads(s, t, backend)
    want = loss_and_grads(s.float(), t.float(), backend)
    assert all(x.dtype == half for x in got)
    rel = 2.0**-bits
    subnormal_step = 2.0**-24 if half == torch.float16 else 0.0
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, rtol=rel, atol=subnormal_step)
    # The half results are also right against the float64 truth on the rounded inputs.
    loss_t = truth(s, t)[0]
    torch.testing.assert_close(got[0].double().cpu(), loss_t, rtol=rel, atol=LOSS_ATOL[torch.float32])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_reductions_and_module(backend_device):
    backend, device = backend_device
    s = make_logits((2, 3, 11), seed=14, device=device)
    t = make_logits((2, 3, 11), seed=15, device=device)
    none = kendall_loss(s, t, backend=backend, reduction="none")
    assert none.shape == (2, 3)
    torch.testing.assert_close(kendall_loss(s, t, backend=backend, reduction="sum"), none.sum())
    torch.testing.assert_close(kendall_loss(s, t, backend=backend), none.mean())
    module = KendallLoss(k=1.0, reduction="none", backend=backend)
    torch.testing.assert_close(module(s, t), none, atol=0, rtol=0)
    assert "k=1.0" in repr(module)
    assert ((none >= 0) & (none <= 2)).all()


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_gradient_only_where_required(backend_device):
    backend, device = backend_device
    s = make_logits((3, 8), seed=16, device=device).requires_grad_(True)
    t = make_logits((3, 8), seed=17, device=device)
    kendall_loss(s, t, backend=backend).backward()
    assert s.grad is not None and t.grad is None
    s2 = s.detach().clone()
    t2 = t.clone().requires_grad_(True)
    kendall_loss(s2, t2, backend=backend).backward()
    assert t2.grad is not None and s2.grad is None
    with torch.no_grad():
        assert kendall_loss(s, t, backend=backend).grad_fn is None


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("wanted", ["student", "teacher", "none"])
def test_each_gradient_alone_matches_reference(backend_device, dtype, hard, wanted):
    """The kernels skip the sums of a gradient nobody asked for: what is left must not change."""
    backend, device = backend_device
    c, k = 100, 1.3
    s = make_logits((3, c), dtype, seed=30, device=device).requires_grad_(wanted == "student")
    t = make_logits((3, c), dtype, seed=31, device=device).requires_grad_(wanted == "teacher")
    loss_t, gs_t, gt_t = truth(s, t, k=k, hard_teacher=hard)
    with torch.set_grad_enabled(wanted != "none"):
        loss = kendall_loss(s, t, k, hard_teacher=hard, reduction="none", backend=backend)
    torch.testing.assert_close(loss.detach().cpu().double(), loss_t, atol=LOSS_ATOL[dtype], rtol=0)
    if wanted == "none":
        assert loss.grad_fn is None
        return
    leaf, want = (s, gs_t) if wanted == "student" else (t, gt_t)
    (grad,) = torch.autograd.grad(loss.sum(), (leaf,))
    torch.testing.assert_close(grad.cpu().double(), want, atol=GRAD_RTOL[dtype] * 2 * k / c, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_mixed_dtypes_promote(backend_device):
    backend, device = backend_device
    s = make_logits((2, 9), torch.float32, seed=18, device=device).requires_grad_(True)
    t = make_logits((2, 9), torch.float64, seed=19, device=device)
    out = kendall_loss(s, t, backend=backend)
    assert out.dtype == torch.float64
    out.backward()
    assert s.grad.dtype == torch.float32


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_empty_batch(backend_device):
    backend, device = backend_device
    s = torch.zeros((0, 5), dtype=torch.float32, device=device, requires_grad=True)
    t = torch.zeros((0, 5), dtype=torch.float32, device=device)
    assert kendall_loss(s, t, backend=backend, reduction="none").shape == (0,)
    out = kendall_loss(s, t, backend=backend, reduction="sum")
    out.backward()
    assert out.item() == 0 and s.grad.shape == (0, 5)


# ---------------------------------------------------------------------------------------------
# Invariances of docs/contract.md, as property tests (float64 inputs, so the tolerance is float64's).

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logit_pairs(draw):
    rows = draw(st.integers(1, 3))
    c = draw(st.integers(2, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 40.0]))
    k = draw(st.floats(0.1, 10.0))
    shift = draw(st.floats(-1e3, 1e3))
    return make_logits((rows, c), seed=seed, scale=scale), make_logits((rows, c), seed=seed + 1, scale=scale), k, shift


@pytest.mark.parametrize("backend_device", BACKENDS)
@SETTINGS
@given(data=logit_pairs())
def test_property_shift_invariance(backend_device, data):
    backend, device = backend_device
    s, t, k, shift = data
    s, t = s.to(device), t.to(device)
    base = kendall_loss(s, t, k, reduction="none", backend=backend)
    torch.testing.assert_close(kendall_loss(s + shift, t, k, reduction="none", backend=backend), base, atol=1e-9, rtol=0)
    torch.testing.assert_close(kendall_loss(s, t - shift, k, reduction="none", backend=backend), base, atol=1e-9, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
@SETTINGS
@given(data=logit_pairs())
def test_property_symmetry_bounds_and_reversal(backend_device, data):
    backend, device = backend_device
    s, t, k, _ = data
    s, t = s.to(device), t.to(device)
    soft = kendall_loss(s, t, k, reduction="none", backend=backend)
    torch.testing.assert_close(kendall_loss(t, s, k, reduction="none", backend=backend), soft, atol=1e-12, rtol=0)
    assert ((soft >= 0) & (soft <= 2)).all()
    # Reversing the student's order flips the sign of tau: loss(-s) = 2 - loss(s).
    for hard in (False, True):
        forward = kendall_loss(s, t, k, hard_teacher=hard, reduction="none", backend=backend)
        reversed_ = kendall_loss(-s, t, k, hard_teacher=hard, reduction="none", backend=backend)
        torch.testing.assert_close(forward + reversed_, torch.full_like(forward, 2.0), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# Bad input and non-finite logits.


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_a_saturated_row_stays_within_the_loss_range(backend_device):
    """A row whose student order equals its teacher's, every pair saturated (k R large): tau sums
    to P within a few ulps, and the CPU kernel's 1 - tau came out at -5.6e-17 (found by the property
    test below). The loss stays in [0, 2]; the gradient is still the kernel's (tiny, not zeroed)."""
    backend, device = backend_device
    s = torch.tensor([[-15.5487, 42.0719, 71.9273, 9.4430, -38.4401]], dtype=torch.float64, device=device)
    t = torch.tensor([[-69.8225, 6.9340, 28.3998, -22.0440, -78.8474]], dtype=torch.float64, device=device)
    s.requires_grad_(True)
    loss = kendall_loss(s, t, 2.0, reduction="none", backend=backend)
    assert 0.0 <= loss.item() <= 2.0
    (grad,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isfinite(grad).all() and grad.abs().max() < 1e-30


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_bad_input_errors(backend_device):
    backend, device = backend_device
    s = make_logits((2, 5), device=device)
    t = make_logits((2, 5), device=device)
    cases = [
        (ValueError, (s, t[:, :4]), {}),
        (ValueError, (s[:, :1], t[:, :1]), {}),
        (ValueError, (s[0, 0], t[0, 0]), {}),
        (ValueError, (s, t), {"top_k": 1}),
        (ValueError, (s, t), {"top_k": 6}),
        (TypeError, (s, t), {"top_k": 2.5}),
        (TypeError, (s, t), {"top_k": "5"}),
        (TypeError, (s, t), {"k": torch.tensor(1.0)}),
        (TypeError, (s, t), {"k": "1.0"}),
        (ValueError, (s, t), {"k": 0.0}),
        (ValueError, (s, t), {"k": -1.0}),
        (ValueError, (s, t), {"k": math.inf}),
        (ValueError, (s, t), {"k": math.nan}),
        (ValueError, (s, t), {"reduction": "avg"}),
        (ValueError, (s, t), {"backend": "fastest"}),
        (TypeError, (s.long(), t), {}),
        (TypeError, (s, t.int()), {}),
        (TypeError, (s, t.bool()), {}),
    ]
    if device == "cuda":
        cases.append((ValueError, (s, t.cpu()), {}))
    for error, args, kwargs in cases:
        with pytest.raises(error):
            kendall_loss(*args, **{"backend": backend, **kwargs})
    with pytest.raises(ValueError):
        KendallLoss(k=-2.0)
    with pytest.raises(TypeError, match=r"k must be a Python float, got a tensor .*pass float\(k\)"):
        KendallLoss(k=torch.tensor(2.0))
    with pytest.raises(ValueError):
        KendallLoss(reduction="avg")


def test_devices_differ_and_unavailable_backends():
    s = make_logits((2, 5))
    meta = torch.empty((2, 5), device="meta")
    with pytest.raises(ValueError, match="different devices"):
        kendall_loss(s, meta)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="not available"):
            kendall_loss(s, s, backend="cuda")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="triton"):
            kendall_loss(s, s, backend="triton")


def test_triton_backend_loads_wherever_triton_imports():
    """The import of the Triton backend turns any failure into "unavailable" (so that a broken
    Triton cannot break the package); this keeps a bug of our own from hiding behind that."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    assert backends._TRITON_MISSING is None, backends._TRITON_MISSING


def test_an_interpreter_too_old_for_this_numpy_is_named(monkeypatch):
    """Triton's interpreter before 3.8 cannot run the kernels under numpy 2 (integer arguments
    arrive as 1-element arrays): the backend is then unavailable on CPU tensors, with that reason,
    instead of failing deep inside the interpreter."""
    triton = pytest.importorskip("triton")
    import numpy

    try:
        int(numpy.ones(1))
        numpy_refuses = False
    except TypeError:
        numpy_refuses = True
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    reason = backends._interpreter_problem()
    if numpy_refuses:
        assert reason is not None and "needs Triton >= 3.8" in reason and "3.6.0" in reason
    else:
        assert reason is None
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    assert backends._interpreter_problem() is None


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_non_finite_rows_are_nan(backend_device, bad, where, top_k):
    backend, device = backend_device
    s = make_logits((3, 10), device=device)
    t = make_logits((3, 10), seed=1, device=device)
    target = s if where == "student" else t
    # Channel 0 of the teacher's ordering might fall outside top_k: put the bad value where the
    # teacher is smallest, so that with top_k it is *not* among the kept channels.
    col = int(t[1].argmin())
    target[1, col] = bad
    loss, gs, gt = loss_and_grads(s, t, backend, top_k=top_k)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2]]).all()
    kept = t[1].topk(top_k).indices if top_k else torch.arange(10, device=device)
    assert torch.isnan(gs[1, kept]).all() and torch.isnan(gt[1, kept]).all()
    assert torch.isfinite(gs[[0, 2]]).all() and torch.isfinite(gt[[0, 2]]).all()


# ---------------------------------------------------------------------------------------------
# torch.compile, the custom op's registration, determinism.


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("hard,top_k", [(False, None), (True, 4)])
def test_torch_compile_fullgraph(backend_device, hard, top_k):
    backend, device = backend_device
    torch._dynamo.reset()
    # Inductor compiles the surrounding graph; under the Triton interpreter there is no GPU for
    # Inductor's own kernels, so there the graph (fake tensors, autograd) runs through aot_eager.
    compiler = "aot_eager" if interpreted(backend, device) else "inductor"

    def forward(s, t):
        return kendall_loss(s, t, 2.0, hard_teacher=hard, top_k=top_k, backend=backend)

    compiled = torch.compile(forward, fullgraph=True, backend=compiler)
    s = make_logits((4, 12), torch.float32, seed=20, device=device)
    t = make_logits((4, 12), torch.float32, seed=21, device=device)
    s1, s2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    eager_loss = forward(s1, t)
    eager_loss.backward()
    compiled_loss = compiled(s2, t)
    compiled_loss.backward()  # AOTAutograd's compiled backward
    torch.testing.assert_close(compiled_loss, eager_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(s2.grad, s1.grad, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_deterministic(backend_device):
    backend, device = backend_device
    s = make_logits((6, 130), torch.float32, seed=22, device=device)
    t = make_logits((6, 130), torch.float32, seed=23, device=device)
    first = loss_and_grads(s, t, backend)
    second = loss_and_grads(s, t, backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cpu_result_does_not_depend_on_thread_count():
    s = make_logits((8, 300), torch.float32, seed=24)
    t = make_logits((8, 300), torch.float32, seed=25)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grads(s, t, "cpu")
        torch.set_num_threads(max(2, threads))
        many = loss_and_grads(s, t, "cpu")
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("c", [4096, 6145])
def test_cpu_long_rows_split_into_chunks(dtype, hard, c):
    """Rows of C >= 4096 are cut into chunks of i (2 for 4096, 3 for 6145) so that fewer rows
    than threads still use every thread. Right against the reference, and the cut must not
    depend on the batch (one row alone runs its chunks on several threads, a batch runs each
    row on one thread) nor on the thread count."""
    k = 1.3
    s = make_logits((3, c), dtype, seed=c)
    t = make_logits((3, c), dtype, seed=c + 1)
    batch = loss_and_grads(s, t, "cpu", k=k, hard_teacher=hard)
    alone = loss_and_grads(s[1:2], t[1:2], "cpu", k=k, hard_teacher=hard)
    for a, b in zip(batch, alone):
        assert torch.equal(a[1:2], b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = loss_and_grads(s[1:2], t[1:2], "cpu", k=k, hard_teacher=hard)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(alone, serial):
        assert torch.equal(a, b)
    assert_matches(alone, truth(s[1:2], t[1:2], k=k, hard_teacher=hard), dtype, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, False)])
def test_opcheck_cpu_op(dtype, need):
    s = make_logits((3, 7), dtype)
    t = make_logits((3, 7), dtype, seed=1)
    torch.library.opcheck(torch.ops.rkkd.kendall.default, (s, t, 1.5, False, *need))


@pytest.mark.parametrize("backend_device", [p for p in BACKENDS if p.values[0][1] == "cuda"])
def test_no_host_device_sync(backend_device):
    """docs/contract.md: no check (NaN rows included) forces a host-device synchronisation."""
    backend, device = backend_device
    s = make_logits((4, 50), torch.float32, device=device).requires_grad_(True)
    t = make_logits((4, 50), torch.float32, seed=1, device=device)
    t[1, 3] = math.nan
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for top_k in (None, 10):
            kendall_loss(s, t, backend=backend, top_k=top_k).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
