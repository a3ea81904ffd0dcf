"""The CUDA extension (csrc/kendall_cuda.cu): compiled wherever it can be compiled, and, on a GPU,
right on the shapes and rows that exercise its tiling, its splitting of rows over blocks and its
three computation paths. The shared suite (test_kendall.py) runs backend "cuda" as well.

Where nvcc and a CUDA build of torch exist (CI machines have both, with or without a GPU), the
package's build compiles the library, and the first test fails when it did not, so a broken CUDA
source cannot pass unnoticed.
"""

from __future__ import annotations

import math
import os
import shutil

import pytest
import torch

import rkkd_kernels
from helpers import LOSS_ATOL, assert_matches, grad_atol, make_logits, truth
from rkkd_kernels import _ext, backends, kendall_loss

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="CUDA kernel tests need a CUDA device; none here")


def test_cuda_kernel_is_built_where_the_toolchain_can():
    """Where nvcc and a CUDA build of torch are (CI machines have both, with or without a GPU), the
    build (setup.py, which `make test` runs first) must have compiled the CUDA kernel: a broken
    CUDA source cannot pass unnoticed. Its library loads and registers rkkd::kendall for CUDA."""
    info = _ext.build_info()
    if info.get("cuda_missing"):
        if shutil.which("nvcc") and torch.version.cuda and os.environ.get("RKKD_BUILD_CUDA") != "0":
            pytest.fail(f"nvcc is here but the CUDA kernel was not built: {info['cuda_missing']}")
        pytest.skip(f"the CUDA kernel is not built here: {info['cuda_missing']}")
    assert info["cuda_arch_list"]
    problem = _ext.CUDA.load()
    assert problem is None, problem
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rkkd::kendall", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("rkkd::kendall", "CPU")


def test_available_backends_tells_the_truth_about_cuda():
    report = rkkd_kernels.available_backends()["cuda"]
    assert report == (_ext.cuda_problem() if HAS_GPU else backends.NO_GPU)
    if not HAS_GPU:
        with pytest.raises(RuntimeError, match="not available"):
            kendall_loss(torch.randn(2, 5, device="cpu"), torch.randn(2, 5), backend="cuda")


# ------------------------------------------------------------------------------------------------
# On a GPU.


def logits(shape, dtype=torch.float32, **kw):
    """This file's inputs default to float32, on the CPU (run() moves them)."""
    return make_logits(shape, dtype, **kw)


def run(student, teacher, backend, device, k=1.0, hard=False, grad_s=True, grad_t=True):
    """Per-row loss and the gradients of its sum (None where not asked), on the CPU as float64."""
    s = student.to(device).requires_grad_(grad_s)
    t = teacher.to(device).requires_grad_(grad_t)
    loss = kendall_loss(s, t, k, hard_teacher=hard, reduction="none", backend=backend)
    wanted = [x for x in (s, t) if x.requires_grad]
    grads = list(torch.autograd.grad(loss.sum(), wanted)) if wanted else []
    gs = grads.pop(0) if grad_s else None
    gt = grads.pop(0) if grad_t else None
    as_cpu = lambda x: None if x is None else x.detach().cpu().double()  # noqa: E731
    return as_cpu(loss), as_cpu(gs), as_cpu(gt)


# Channel counts around the kernel's chunks (32) and tiles (256), and several tiles.
TILING_C = [2, 3, 31, 32, 33, 63, 255, 256, 257, 511, 513, 1000, 1500]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("c", TILING_C)
def test_tiling_matches_reference(c, hard, dtype):
    rows = 3
    s, t = logits((rows, c), dtype, seed=c), logits((rows, c), dtype, seed=c + 1)
    k = 0.7
    assert_matches(run(s, t, "cuda", "cuda", k, hard), truth(s, t, k=k, hard_teacher=hard), dtype, k)


@needs_gpu
@pytest.mark.parametrize("grad_s,grad_t", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_each_gradient_only_when_asked(grad_s, grad_t, hard):
    """The kernel keeps the teacher's sums only when asked; the loss and the other gradient agree."""
    c = 300
    s, t = logits((4, c), seed=1), logits((4, c), seed=2)
    got = run(s, t, "cuda", "cuda", 1.3, hard, grad_s, grad_t)
    want = truth(s, t, k=1.3, hard_teacher=hard)
    assert (got[1] is None) != grad_s and (got[2] is None) != grad_t
    assert_matches(got, want, torch.float32, 1.3)


@needs_gpu
@pytest.mark.parametrize("rows,c", [(1, 3000), (2, 1024), (4096, 40), (70000, 5)])
def test_rows_split_over_blocks_or_not(rows, c):
    """One long row spreads over many blocks (scratch slices summed in order); many rows get one
    block each; more than 65535 rows must still fit the grid."""
    s, t = logits((rows, c), seed=rows), logits((rows, c), seed=rows + 1)
    got = run(s, t, "cuda", "cuda")
    want = truth(s, t)
    assert_matches(got, want, torch.float32)


# Significant bits of each input dtype: results in a half type are float32 results rounded to it.
BITS = {torch.float16: 11, torch.bfloat16: 8}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
def test_every_path_in_one_batch(dtype, hard):
    """Rows on the float ratio form, the double ratio form (k * spread in (80, 700]), direct tanh
    (k * spread > 700), and non-finite rows, side by side in one launch."""
    c, k = 70, 1.0
    s = logits((6, c), torch.float64, scale=1.0, seed=7)
    t = logits((6, c), torch.float64, scale=1.0, seed=8)
    s[1] *= 40.0  # spread about 200: the double ratio form
    t[1] *= 40.0
    s[2] *= 400.0  # spread about 2000: direct tanh
    s[3, 5] = math.nan
    s[4, 9] = math.inf
    t[5, 0] = -math.inf  # a teacher's bad logit makes the row NaN too
    s, t = s.to(dtype), t.to(dtype)
    got = run(s, t, "cuda", "cuda", k, hard)
    want = truth(s, t, k=k, hard_teacher=hard)  # on the same (rounded) inputs
    good, bad = [0, 1, 2], [3, 4, 5]
    if dtype in BITS:
        rel = 2.0 ** -BITS[dtype]
        atols = (LOSS_ATOL[torch.float32], grad_atol(torch.float32, k, c) + 2.0**-24)
        for g, w, atol in zip(got, want, (atols[0], atols[1], atols[1])):
            torch.testing.assert_close(g[good], w[good], rtol=rel, atol=atol)
    else:
        assert_matches(tuple(x[good] for x in got), tuple(x[good] for x in want), dtype, k)
    assert torch.isnan(got[0][bad]).all() and torch.isnan(got[1][bad]).all()
    if hard:  # the hard teacher's gradient is identically zero, NaN rows included
        assert torch.equal(got[2][bad], torch.zeros_like(got[2][bad]))
    else:
        assert torch.isnan(got[2][bad]).all()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_agree_with_cpu_kernel(dtype):
    """Both kernels compute half inputs in float32; their results, each rounded to the half type,
    may differ by one ulp of it where the float32 values straddle a rounding boundary."""
    c = 257
    s, t = logits((5, c), dtype, seed=3), logits((5, c), dtype, seed=4)
    got = run(s, t, "cuda", "cuda")
    want = run(s, t, "cpu", "cpu")
    one_ulp = 2.0 ** (1 - BITS[dtype])
    atols = (LOSS_ATOL[torch.float32], grad_atol(torch.float32, 1.0, c) + 2.0**-24)
    for g, w, atol in zip(got, want, (atols[0], atols[1], atols[1])):
        torch.testing.assert_close(g, w, rtol=one_ulp, atol=atol)


@needs_gpu
def test_bitwise_deterministic_with_split_rows():
    s, t = logits((64, 1000), seed=11), logits((64, 1000), seed=12)
    first = run(s, t, "cuda", "cuda")
    for _ in range(3):
        again = run(s, t, "cuda", "cuda")
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@needs_gpu
def test_extra_memory_is_linear_in_rows_times_c():
    """Outputs, the gradient of the backward and the kernel's scratch (at most 64 slices of
    rows x C): tens of rows x C, where the reference would take rows x C x C."""
    rows, c = 64, 4096
    s = logits((rows, c), seed=13).cuda().requires_grad_(True)
    t = logits((rows, c), seed=14).cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    kendall_loss(s, t, backend="cuda").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    rows_by_c = rows * c * 4
    assert extra < 72 * rows_by_c, f"{extra} bytes for {rows} x {c}"
    assert extra < rows * c * c * 4 / 50


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, False)])
def test_opcheck_cuda_op(dtype, need):
    s, t = logits((3, 40), dtype).cuda(), logits((3, 40), dtype, seed=1).cuda()
    torch.library.opcheck(torch.ops.rkkd.kendall.default, (s, t, 1.5, False, *need))


@needs_gpu
def test_runs_on_the_current_stream_and_device_of_the_inputs():
    s, t = logits((16, 300), seed=15), logits((16, 300), seed=16)
    want = run(s, t, "cuda", "cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = run(s, t, "cuda", "cuda")
    stream.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    if torch.cuda.device_count() > 1:  # the kernel runs on the inputs' device, not the current one
        got = run(s, t, "cuda", "cuda:1")
        assert_matches(got, truth(s, t), torch.float32)
