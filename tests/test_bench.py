"""The benchmark's --quick preset runs and writes what benchmarks/README.md promises (CSV columns, rows,
plots)."""

import csv
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, tool_env
from rkkd_kernels import available_backends
REQUIRED_COLUMNS = {
    "backend", "mode", "B", "C", "dtype", "top_k", "median_ms", "iqr_ms", "peak_mem_mb",
    "pairs_per_s", "speedup_vs_eager", "speedup_vs_compile", "compile_s", "status",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_quick")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_kendall", "--quick", "--out", str(out)],
        cwd=REPO_ROOT, env=tool_env(), capture_output=True, text=True, timeout=300,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return out, rows, proc.stdout, elapsed


def test_quick_preset_stays_small(quick_run):
    """The preset's size, not its time, is what a test can hold (a busy machine runs 3x slower):
    its cells are the small ones (at most B=256 x C=1000 rows of pairs) that keep it a smoke test
    of about a minute on these machines. The time is printed for the log."""
    _, rows, _, elapsed = quick_run
    print(f"--quick took {elapsed:.0f} s")
    cells = {(int(r["B"]), int(r["C"])) for r in rows}
    assert cells and len(cells) <= 4, cells
    assert all(b * c * (c - 1) // 2 <= 256 * 1000 * 999 // 2 for b, c in cells), cells


def test_csv_has_the_columns(quick_run):
    _, rows, _, _ = quick_run
    assert rows
    assert REQUIRED_COLUMNS <= set(rows[0])


def test_a_row_for_every_provider_and_mode(quick_run):
    _, rows, _, _ = quick_run
    # The fused backends that run natively on the CPU here (Triton and CUDA need a GPU).
    fast_on_cpu = [name for name in ("cpu",) if available_backends()[name] is None]
    for backend in ["reference", "reference_compiled"] + fast_on_cpu:
        measured = [r for r in rows if r["backend"] == backend and r["status"] == "ok"]
        assert {r["mode"] for r in measured} == {"forward", "backward", "forward+backward"}, backend
        for r in measured:
            assert float(r["median_ms"]) > 0 and float(r["pairs_per_s"]) > 0
            assert float(r["peak_mem_mb"]) >= 0
    for backend in fast_on_cpu:
        assert any(r["speedup_vs_eager"] for r in rows if r["backend"] == backend)
    assert any(r["compile_s"] for r in rows if r["backend"] == "reference_compiled")


def test_fused_backend_memory_is_far_below_the_reference(quick_run):
    """On the largest quick cell the fused kernel holds O(rows * C), the reference rows * C * C."""
    _, rows, _, _ = quick_run
    if available_backends()["cpu"] is not None:
        pytest.skip("the C++ CPU kernel is not built")

    def peak(backend):
        return float(next(r["peak_mem_mb"] for r in rows if r["backend"] == backend
                          and r["mode"] == "forward+backward" and r["B"] == "256" and r["C"] == "100"))

    assert peak("cpu") < peak("reference") / 10


def test_plots_and_tables_are_written(quick_run):
    out, _, stdout, _ = quick_run
    for name in ("time_vs_C.png", "memory_vs_C.png", "speedup.png"):
        assert (out / name).stat().st_size > 1000, name
    assert (out / "tables.md").read_text().count("|") > 10
    assert "forward+backward" in stdout

