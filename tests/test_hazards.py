"""Hazards at the edges of the kernels' ranges: rows near the dtype's largest value, the launch grid's
limits, tiny k, and inputs on a GPU other than the current one."""

from __future__ import annotations

import pytest
import torch

from conftest import backend_params
from rkkd_kernels import backends
from helpers import assert_row_precise, loss_and_grads, truth

BACKENDS = backend_params()
# The backends that launch GPU grids (the Triton kernel, also under its interpreter, and CUDA).
GRID_BACKENDS = [p for p in BACKENDS if p.values[0][0] != "cpu"]

LARGEST = {torch.float32: 3.4e38, torch.float64: 1.7e308}


def _near_largest(dtype, rows, c, seed, sign=1.0):
    """Rows in [0.99 L, L] for L the dtype's largest (rounded) value: max + min overflows."""
    g = torch.Generator().manual_seed(seed)
    top = LARGEST[dtype]
    return (sign * (top - 0.01 * top * torch.rand(rows, c, generator=g, dtype=torch.float64))).to(dtype)


@pytest.mark.parametrize("backend_device", BACKENDS + [pytest.param(("reference", "cpu"), id="reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_near_the_largest_value(backend_device, dtype):
    """A row's centre (max + min) / 2 must not overflow: the loss and gradients of rows near the
    dtype's largest value are those of the same rows shifted to zero (and finite), at a k for
    which k * spread takes the ratio form and at k = 1 (direct form)."""
    backend, device = backend_device
    rows, c = 3, 12
    s = _near_largest(dtype, rows, c, seed=0)
    t = _near_largest(dtype, rows, c, seed=1, sign=-1.0)
    # Exact shifts (Sterbenz: the difference of two floats within a factor 2 of each other).
    shift = torch.tensor(0.995 * LARGEST[dtype], dtype=dtype)
    s_shifted, t_shifted = s - shift, t + shift
    spread = float((s.double().amax(-1) - s.double().amin(-1)).max())
    for k in (0.5 / spread, 20.0 / spread, 1.0):  # small-spread form, ratio form, direct form
        if backend == "triton" and k < 2.0**-100:
            continue  # below the Triton kernel's k range: test_triton_rejects_k_below_its_range
        for hard in (False, True):
            got = loss_and_grads(s.to(device), t.to(device), backend, k=k, hard_teacher=hard)
            assert all(torch.isfinite(x).all() for x in got)
            want = loss_and_grads(s_shifted.to(device), t_shifted.to(device), backend, k=k,
                                  hard_teacher=hard)
            assert_row_precise(got, want, dtype)


@pytest.mark.parametrize("backend_device", BACKENDS + [pytest.param(("reference", "cpu"), id="reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_rows_spanning_the_whole_range(backend_device, dtype):
    """max - min overflows to inf: the row takes the direct form, where every pair saturates."""
    backend, device = backend_device
    s = torch.cat([_near_largest(dtype, 2, 5, seed=2), _near_largest(dtype, 2, 5, seed=3, sign=-1.0)], 1)
    t = s.flip(1).clone()
    loss, gs, gt = (x.cpu().double() for x in loss_and_grads(s.to(device), t.to(device), backend, k=1.0))
    want_loss, want_gs, want_gt = truth(s, t, k=1.0)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(gs, want_gs, atol=0, rtol=0)  # every pair saturated: all zero
    torch.testing.assert_close(gt, want_gt, atol=0, rtol=0)


def test_triton_rejects_k_below_its_range():
    """Triton passes k as float32 halves: a k below 2^-100 would lose its low half (and below
    float32's range, all of it) and compute garbage; it is refused with a clear error instead."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reason = backends.why_unavailable("triton", torch.device(device))
    if reason is not None:
        pytest.skip(reason)
    from rkkd_kernels import triton_pairs as tk

    s = torch.randn(2, 5, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match="k"):
        torch.ops.rkkd.kendall_triton(s, s, 1e-306, False, False, False)
    assert tk.K_RANGE.low == 2.0**-100
    loss, _, _ = torch.ops.rkkd.kendall_triton(s, s, tk.K_RANGE.low, False, False, False)
    assert torch.isfinite(loss).all()


@pytest.mark.parametrize("backend_device", GRID_BACKENDS)
def test_too_many_rows_for_the_grid(backend_device):
    """Rows go on grid axis 0 (at most 2^31 - 1 blocks): more rows get a clear error, not a launch
    failure or a wrapped index. A broadcast tensor holds 2^31 rows in 8 bytes."""
    backend, device = backend_device
    x = torch.zeros(1, 2, device=device).expand(2**31, 2)
    op = torch.ops.rkkd.kendall_triton if backend == "triton" else torch.ops.rkkd.kendall
    with pytest.raises(RuntimeError, match="rows"):
        op(x, x, 1.0, False, False, False)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("backend_device", [p for p in GRID_BACKENDS if p.values[0][1] == "cuda"])
def test_inputs_on_another_gpu(backend_device):
    """Inputs on cuda:1 while cuda:0 is current (DDP code that moves tensors without set_device):
    each launch runs on the inputs' device, the results match the CPU's, and the current device is
    left as it was."""
    backend, _ = backend_device
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 300, generator=g)
    t = torch.randn(5, 300, generator=g)
    with torch.cuda.device(0):
        got = loss_and_grads(s.to("cuda:1"), t.to("cuda:1"), backend, k=1.0)
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
    assert_row_precise(got, truth(s, t, k=1.0), torch.float32)
