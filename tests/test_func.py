"""torch.func transforms of kendall_loss, on every fast backend: grad, vjp, vmap (through the ops'
batching rule, never vmap's per-example fallback), vmap of grad (per-sample gradients) and grad of
vmap, each against plain autograd; and a second derivative, refused with a clear error.

vmap's fallback is switched off for this file (the autouse fixture), so an op without a batching
rule fails here instead of silently running example by example; test_no_fallback_warning checks,
with the fallback on, that nothing warns about a missing rule either.

The transforms run the same kernels as autograd does, on the same rows, so their results must be
equal to autograd's bitwise; the kernels themselves are checked against the float64 reference in
test_kendall.py. Shapes are small: the Triton backend runs under its interpreter without a GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import grad, vjp, vmap

from conftest import backend_params
from helpers import make_logits
from rkkd_kernels import kendall_loss

BACKENDS = backend_params()
K = 1.3


@pytest.fixture(autouse=True)
def no_vmap_fallback():
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def inputs(device, shape=(3, 9), seed=0):
    return make_logits(shape, seed=seed, device=device), make_logits(shape, seed=seed + 1, device=device)


def autograd_grads(fn, s, t, cotangent=None, wrt=(0, 1)):
    """d fn(s, t) / d (s, t)[wrt] by plain autograd, on fresh leaves; only those require grad (the
    kernels skip the sums of a gradient nobody asks for, which may change the last bit of others)."""
    leaves = [x.detach().clone().requires_grad_(i in wrt) for i, x in enumerate((s, t))]
    out = fn(*leaves)
    return torch.autograd.grad(out, [leaves[i] for i in wrt], cotangent)


def assert_equal(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize(
    "hard,top_k", [(False, None), (True, None), (False, 4)], ids=["soft", "hard", "top4"]
)
def test_grad_matches_autograd(backend_device, hard, top_k):
    backend, device = backend_device
    s, t = inputs(device)

    def loss(s, t):
        return kendall_loss(s, t, K, hard_teacher=hard, top_k=top_k, backend=backend)

    want = autograd_grads(loss, s, t)
    assert_equal(grad(loss, argnums=(0, 1))(s, t), want)
    # One input at a time: the other is a constant, and the kernel skips its sums.
    assert_equal([grad(loss, argnums=0)(s, t)], autograd_grads(loss, s, t, wrt=(0,)))
    assert_equal([grad(loss, argnums=1)(s, t)], autograd_grads(loss, s, t, wrt=(1,)))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_vjp_matches_autograd(backend_device):
    backend, device = backend_device
    s, t = inputs(device)

    def rows(s, t):
        return kendall_loss(s, t, K, reduction="none", backend=backend)

    cotangent = torch.tensor([0.5, -2.0, 3.0], dtype=s.dtype, device=device)
    out, pullback = vjp(rows, s, t)
    torch.testing.assert_close(out, rows(s, t), atol=0, rtol=0)
    assert_equal(pullback(cotangent), autograd_grads(rows, s, t, cotangent))


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize(
    "in_dims",
    [(0, 0), (0, None), (None, 0), (1, None), (2, 0)],
    ids=["both", "student", "teacher", "dim1", "dim2"],
)
def test_vmap_is_more_rows(backend_device, in_dims):
    """vmap over a dimension of either input, or both, equals the loss of each example alone."""
    backend, device = backend_device
    batch, rows, c = 4, 2, 9

    def batched_shape(dim):  # the vmapped dimension of size `batch` at position `dim` of (rows, C)
        shape = [rows, c]
        if dim is not None:
            shape.insert(dim, batch)
        return tuple(shape)

    s = make_logits(batched_shape(in_dims[0]), seed=2, device=device)
    t = make_logits(batched_shape(in_dims[1]), seed=3, device=device)

    def example(x, dim, i):
        return x if dim is None else x.select(dim, i)

    for reduction in ("none", "mean"):
        def loss(s, t):
            return kendall_loss(s, t, K, reduction=reduction, backend=backend)

        got = vmap(loss, in_dims=in_dims)(s, t)
        want = torch.stack([loss(example(s, in_dims[0], i), example(t, in_dims[1], i)) for i in range(batch)])
        assert got.shape == want.shape == ((batch, rows) if reduction == "none" else (batch,))
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("wrt", [0, 1], ids=["student", "teacher"])
def test_per_sample_gradients(backend_device, wrt):
    """vmap(grad(...)): the gradient of each example's loss, as autograd gives it one by one."""
    backend, device = backend_device
    batch, rows, c = 3, 2, 7
    s = make_logits((batch, rows, c), seed=4, device=device)
    t = make_logits((rows, c), seed=5, device=device)  # one teacher for every example

    def loss(s, t):
        return kendall_loss(s, t, K, backend=backend)

    got = vmap(grad(loss, argnums=wrt), in_dims=(0, None))(s, t)
    want = torch.stack([autograd_grads(loss, s[i], t, wrt=(wrt,))[0] for i in range(batch)])
    assert got.shape == (batch, rows, c)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_grad_of_vmap_and_autograd_through_vmap(backend_device):
    """The other nesting, grad(vmap(...)), and plain autograd through a vmap: both are the gradient
    of the summed losses of a (batch * rows, C) block."""
    backend, device = backend_device
    s = make_logits((3, 2, 8), seed=6, device=device)
    t = make_logits((3, 2, 8), seed=7, device=device)

    def total(s, t):
        return vmap(lambda s, t: kendall_loss(s, t, K, backend=backend))(s, t).sum()

    def flat(s, t):
        return kendall_loss(s, t, K, reduction="none", backend=backend).mean(-1).sum()

    want = autograd_grads(flat, s, t)
    assert_equal(grad(total, argnums=(0, 1))(s, t), want)
    assert_equal(autograd_grads(total, s, t), want)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize(
    "need", [(True, True), (True, False), (False, False)], ids=["both", "student", "none"]
)
def test_vmap_of_the_op(backend_device, need):
    """The batching rule on the op itself: gradients not asked for stay the op's empty (0,) tensors."""
    backend, device = backend_device
    op = torch.ops.rkkd.kendall if backend != "triton" else torch.ops.rkkd.kendall_triton
    s = make_logits((4, 3, 10), seed=8, device=device)
    t = make_logits((3, 10), seed=9, device=device)
    got = vmap(op, in_dims=(0, None, None, None, None, None))(s, t, K, False, *need)
    per_example = [op(s[i], t, K, False, *need) for i in range(4)]
    for j, output in enumerate(got):  # loss (4, 3); each gradient (4, 3, 10), or (4, 0) not asked for
        torch.testing.assert_close(output, torch.stack([p[j] for p in per_example]), atol=0, rtol=0)


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_no_fallback_warning(backend_device, capfd):
    """With vmap's fallback on, as a user has it, nothing warns about a missing batching rule."""
    backend, device = backend_device
    torch._C._functorch._set_vmap_fallback_enabled(True)
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)
    s = make_logits((2, 3, 6), seed=10, device=device)
    t = make_logits((3, 6), seed=11, device=device)

    def loss(s, t):
        return kendall_loss(s, t, K, backend=backend)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vmap(loss, in_dims=(0, None))(s, t)
        vmap(grad(loss), in_dims=(0, None))(s, t)
    messages = [str(w.message) for w in caught] + capfd.readouterr().err.splitlines()
    assert not [m for m in messages if "batching rule" in m or "fallback" in m], messages


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_second_derivative_is_refused(backend_device):
    """The op saves first derivatives only. A backward with create_graph=True works (torch.func.grad
    always runs one); differentiating its result again must fail loudly, not come out wrong."""
    backend, device = backend_device
    s, t = inputs(device)
    s.requires_grad_(True)

    def loss(s, t):
        return kendall_loss(s, t, K, backend=backend)

    (first,) = torch.autograd.grad(loss(s, t), s, create_graph=True)
    assert_equal([first.detach()], autograd_grads(loss, s, t, wrt=(0,)))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(first.pow(2).sum(), s)
    with pytest.raises(RuntimeError, match="double backward"):
        grad(lambda s: grad(loss)(s, t).pow(2).sum())(s.detach())


# torch.compile of torch.func.grad around the op: torch 2.6's tracer runs the op's own autograd
# under the transform and refuses it; 2.11 and 2.14 pass (versions in between not checked).
OLD_TORCH_COMPILE = torch.__version__ < "2.11"


@pytest.mark.skipif(OLD_TORCH_COMPILE, reason="torch.compile of torch.func transforms of the op "
                    "needs torch >= 2.11 (fails in torch 2.6's tracer; 2.7-2.10 not checked)")
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_compiled_grad_and_vmap(backend_device):
    """torch.compile(fullgraph=True) of grad, of vmap, and of a vmap that autograd differentiates,
    gives what eager mode gives. (Not vmap of grad: torch's compiler cannot vmap an
    autograd.Function inside a compiled grad.) A compiled transform asks the kernel for both
    gradients (ops.needs_grad cannot look through vmap while tracing), which may move the last bit
    of float64 results: a tolerance of 1e-14 on gradients of order 0.1."""
    backend, device = backend_device
    s = make_logits((2, 3, 7), seed=12, device=device)
    t = make_logits((3, 7), seed=13, device=device)

    def loss(s, t):
        return kendall_loss(s, t, K, backend=backend)

    batched = vmap(loss, in_dims=(0, None))
    for transform, args in ((grad(loss), (s[0], t)), (batched, (s, t))):
        torch._dynamo.reset()
        compiled = torch.compile(transform, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), transform(*args), atol=1e-14, rtol=0)
    # Autograd through the compiled vmap.
    leaf = s.clone().requires_grad_(True)
    compiled(leaf, t).sum().backward()
    want = autograd_grads(lambda s, t: batched(s, t).sum(), s, t, wrt=(0,))[0]
    torch.testing.assert_close(leaf.grad, want, atol=1e-14, rtol=0)
