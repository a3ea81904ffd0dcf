"""Benchmark kendall_loss: every fast backend against the eager and the compiled reference.

    python -m benchmarks.bench_kendall                    # full CPU grid + end-to-end step (< 15 min)
    python -m benchmarks.bench_kendall --quick            # CI smoke test (small cells, < 2 min)
    python -m benchmarks.bench_kendall --headline         # B=256, C=1000, float32, forward+backward
    python -m benchmarks.bench_kendall --e2e              # only the ResNet-18 training step
    python -m benchmarks.bench_kendall --device cuda      # the GPU preset (a few minutes)

Writes into --out (default benchmarks/results/): results.csv (or headline.csv), e2e.csv,
tables.md, run_info.json, time_vs_C.png, memory_vs_C.png, speedup.png; the worker logs in tmp/.

Each cell is measured in child processes (benchmarks/worker.py): one times it, one (on the CPU)
measures its peak resident-set growth. Reference cells whose estimated memory exceeds --mem-cap-gb
are skipped, not attempted; the estimate is (B x n x n matrix bytes) x (the number of such matrices
the reference was measured to hold, on a calibration shape and on the smaller cells of this run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

from . import report
from .e2e import E2ESpec
from .measure import DTYPES, MODES, REFERENCE_PROVIDERS, Spec, cxc_bytes, pairs_per_row
from .worker import MEMORY_WORKER_ENV, REPO_ROOT, Worker

DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "results")
HEADLINE = (256, 1000)  # B, C of the headline figure (an ImageNet-sized batch)

# The reference's memory, in B x n x n matrices, is measured on this shape before any cell that could
# come near the cap; cells of at least CALIBRATION_MIN_BYTES per matrix refine it as the run goes.
CALIBRATION_SHAPE = (4, 2048)
CALIBRATION_MIN_BYTES = 16 * 2**20
# Until measured, a reference is assumed to hold at most this many matrices (only used to decide
# whether a calibration is needed at all).
MATRICES_UPPER_BOUND = 16


@dataclass(frozen=True)
class Shape:
    batch: int
    classes: int
    top_k: Optional[int] = None


@dataclass(frozen=True)
class Preset:
    name: str
    shapes: Tuple[Shape, ...]
    modes: Tuple[str, ...]
    min_run_time_s: float  # per cell and mode; slow calls get min_reps calls instead
    min_reps: int
    e2e: bool
    csv_name: str = "results.csv"


def grid(batches: Sequence[int], classes: Sequence[int], top_ks: Sequence[int], top_k_classes: int):
    shapes = [Shape(b, c) for b in batches for c in classes]
    shapes += [Shape(b, top_k_classes, k) for b in batches for k in top_ks]
    return tuple(shapes)


PRESETS: Dict[str, Preset] = {
    # The full grid: B in {32, 256, 1024}, C in {10, 100, 1000, 4096}, and C=32000 with top_k.
    "full": Preset("full", grid((32, 256, 1024), (10, 100, 1000, 4096), (256, 1024), 32000),
                   MODES, 0.25, 3, True),
    # CI smoke: small cells only, every provider and mode, a top_k cell.
    "quick": Preset("quick", (Shape(32, 10), Shape(32, 100), Shape(256, 100), Shape(32, 1000, 64)),
                    MODES, 0.1, 3, False),
    # GPU: fewer shapes, because each compiled-reference shape costs a compilation (gpu_check.sh
    # has a few minutes for the whole benchmark).
    "gpu": Preset("gpu", grid((32, 256, 1024), (100, 1000, 4096), (), 32000)
                  + (Shape(256, 32000, 256), Shape(256, 32000, 1024), Shape(1024, 32000, 1024)),
                  MODES, 0.1, 5, True),
    "headline": Preset("headline", (Shape(*HEADLINE),), ("forward+backward",), 1.0, 5, False,
                       csv_name="headline.csv"),
}


# --------------------------------------------------------------------------------------- providers
def fast_backends(device: str) -> Tuple[List[str], Dict[str, str]]:
    """The fused backends that run natively on ``device`` here, and why the others do not (each
    backend's answer is for the device it serves here: the CPU, or the GPU where one is)."""
    from rkkd_kernels import available_backends

    candidates = ("cpu",) if device == "cpu" else ("triton", "cuda")
    reasons = available_backends()
    present, absent = [], {}
    for name in candidates:
        reason = reasons[name]
        if reason is None:
            present.append(name)
        else:
            absent[name] = reason
    return present, absent


# --------------------------------------------------------------------------------- the grid itself
class MemoryModel:
    """How many B x n x n matrices each reference provider holds at its peak, as measured."""

    def __init__(self) -> None:
        self.matrices: Dict[Tuple[str, str], float] = {}

    def learn(self, provider: str, dtype: str, shape: Shape, peaks_mb: Dict[str, float]) -> None:
        matrix = cxc_bytes(shape.batch, shape.classes, shape.top_k, dtype)
        if matrix < CALIBRATION_MIN_BYTES or not peaks_mb:
            return
        measured = max(peak * 2**20 for peak in peaks_mb.values()) / matrix
        key = (provider, dtype)
        self.matrices[key] = max(self.matrices.get(key, 0.0), measured)

    def estimate_gb(self, provider: str, dtype: str, shape: Shape) -> Optional[float]:
        matrices = self.matrices.get((provider, dtype))
        if matrices is None:
            return None
        return matrices * cxc_bytes(shape.batch, shape.classes, shape.top_k, dtype) / 1e9


def _spec(provider: str, device: str, dtype: str, shape: Shape, modes, preset: Preset) -> Spec:
    return Spec(provider=provider, device=device, dtype=dtype, batch=shape.batch,
                classes=shape.classes, top_k=shape.top_k, modes=tuple(modes),
                min_run_time_s=preset.min_run_time_s, min_reps=preset.min_reps)


def _base_row(provider: str, device: str, dtype: str, shape: Shape, mode: str) -> report.Row:
    pairs = shape.batch * pairs_per_row(shape.classes, shape.top_k)
    return dict(backend=provider, device=device, mode=mode, B=shape.batch, C=shape.classes,
                dtype=dtype, top_k=shape.top_k, pairs=pairs, median_ms=None, iqr_ms=None, min_ms=None,
                samples=None, peak_mem_mb=None, pairs_per_s=None, compile_s=None,
                cxc_matrices=None, est_mem_gb=None, loss_value=None, status="ok")


def run_grid(preset: Preset, device: str, dtypes: Sequence[str], providers: Sequence[str],
             timer: Worker, memory_meter: Worker, mem_cap_gb: float, progress: tqdm,
             rows: List[report.Row]) -> None:
    """Measure the grid, appending each cell's rows to ``rows`` as it finishes (an interrupted run
    keeps what it has measured)."""
    memory = MemoryModel()
    shapes = sorted(preset.shapes, key=lambda s: cxc_bytes(s.batch, s.classes, s.top_k, "float32"))
    for dtype in dtypes:
        largest = max(cxc_bytes(s.batch, s.classes, s.top_k, dtype) for s in shapes)
        if largest * MATRICES_UPPER_BOUND > mem_cap_gb * 1e9:
            for provider in (p for p in providers if p in REFERENCE_PROVIDERS):
                progress.set_postfix_str(f"calibrating {provider} memory, {dtype}")
                calibration = Shape(*CALIBRATION_SHAPE)
                spec = _spec(provider, device, dtype, calibration, MODES, preset)
                reply = memory_meter.request("memory", spec)
                if reply["status"] == "ok":
                    memory.learn(provider, dtype, calibration, reply["modes"])
                else:  # without a measured figure, assume the upper bound: skips more, never less
                    memory.matrices[(provider, dtype)] = float(MATRICES_UPPER_BOUND)
                progress.update()
        for shape in shapes:
            for provider in providers:
                progress.set_postfix_str(f"{report.label(provider)} B={shape.batch} C={shape.classes}"
                                         + (f" top_k={shape.top_k}" if shape.top_k else ""))
                rows += run_cell(preset, device, dtype, shape, provider, timer, memory_meter,
                                 memory, mem_cap_gb)
                progress.update()


def run_cell(preset: Preset, device: str, dtype: str, shape: Shape, provider: str, timer: Worker,
             memory_meter: Worker, memory: MemoryModel, mem_cap_gb: float) -> List[report.Row]:
    """The rows of one provider on one shape, one per mode (skipped, measured, or failed)."""
    rows = [_base_row(provider, device, dtype, shape, mode) for mode in preset.modes]
    estimate = memory.estimate_gb(provider, dtype, shape) if provider in REFERENCE_PROVIDERS else None
    for row in rows:
        row["est_mem_gb"] = estimate
    if estimate is not None and estimate > mem_cap_gb:
        for row in rows:
            row["status"] = f"skipped: needs ~{estimate:.1f} GB > cap {mem_cap_gb:g} GB"
        return rows

    spec = _spec(provider, device, dtype, shape, preset.modes, preset)
    times = timer.request("times", spec)
    if times["status"] != "ok":
        for row in rows:
            row["status"] = times["status"]
        return rows
    peaks = memory_meter.request("memory", spec)
    if peaks["status"] == "ok" and provider in REFERENCE_PROVIDERS:
        memory.learn(provider, dtype, shape, peaks["modes"])
    matrix = cxc_bytes(shape.batch, shape.classes, shape.top_k, dtype)
    for row in rows:
        timing = times["modes"][row["mode"]]
        row.update(median_ms=timing["median_ms"], iqr_ms=timing["iqr_ms"], min_ms=timing["min_ms"],
                   samples=timing["samples"], compile_s=times["compile_s"],
                   loss_value=times["loss_value"])
        row["pairs_per_s"] = row["pairs"] / (row["median_ms"] / 1e3)
        if peaks["status"] == "ok":
            row["peak_mem_mb"] = peaks["modes"][row["mode"]]
            row["cxc_matrices"] = row["peak_mem_mb"] * 2**20 / matrix
        else:
            row["status"] = f"ok; memory {peaks['status']}"
    return rows


def run_e2e(device: str, backends_to_run: Sequence[str], timer: Worker, memory_meter: Worker,
            progress: tqdm) -> List[report.Row]:
    image_px = 32 if device == "cpu" else 224
    rows: List[report.Row] = []
    ce_only: Dict[str, float] = {}
    for backend in backends_to_run:
        progress.set_postfix_str(f"end-to-end ResNet-18 step, {backend}")
        spec = E2ESpec(backend=backend, device=device, image_px=image_px, with_ce_only=not ce_only)
        row: report.Row = dict(backend=backend, device=device, batch=spec.batch, image_px=image_px)
        times = timer.request("e2e_times", spec)
        row.update(times)
        if times["status"] == "ok":
            if "step_ce_only_ms" in times:
                ce_only = {k: times[k] for k in ("step_ce_only_ms", "step_ce_only_iqr_ms")}
            row.update(ce_only)
            peak = memory_meter.request("e2e_memory", spec)
            row["step_peak_mem_mb"] = peak.get("step_peak_mem_mb")
        rows.append(row)
        progress.update()
    reference = next((r for r in rows if r["backend"] == "reference" and r["status"] == "ok"), None)
    for row in rows:
        ok = reference is not None and row["status"] == "ok"
        row["step_speedup_vs_reference"] = reference["step_ms"] / row["step_ms"] if ok else None
    return rows


# ------------------------------------------------------------------------------------------ output
def machine_info(device: str) -> Dict[str, object]:
    info: Dict[str, object] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # Other work on the machine shows in the timings: the load is recorded at start and end.
        "load_average_at_start": os.getloadavg(),
        "parallel_probe_at_start": parallel_probe(),
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def parallel_probe() -> Dict[str, float]:
    """tanh of 2M floats on one thread and on all: on a shared machine, whether the cores were free.

    A ratio (one thread / all threads) near the thread count means they were; below 1, the other
    cores were busy elsewhere and every parallel region waited for them.
    """
    x = torch.randn(2_000_000)
    threads = torch.get_num_threads()
    result = {}
    for n in (1, threads):
        torch.set_num_threads(n)
        torch.tanh(x)
        start = time.perf_counter()
        for _ in range(20):
            torch.tanh(x)
        result[f"tanh_2M_{n}_threads_ms"] = round((time.perf_counter() - start) / 20 * 1e3, 3)
    torch.set_num_threads(threads)
    result["parallel_speedup"] = round(result["tanh_2M_1_threads_ms"] / result[f"tanh_2M_{threads}_threads_ms"], 2)
    return result


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def headline_table(rows: List[report.Row], markdown: bool = False) -> Optional[str]:
    """The B=256, C=1000, forward+backward cell: time and peak extra memory side by side."""
    cell = [r for r in rows if (r["B"], r["C"], r["top_k"], r["mode"]) == HEADLINE + (None, "forward+backward")]
    if not cell:
        return None
    header = ["provider", "dtype", "median ms", "IQR ms", "peak extra MB", "x eager", "x compiled",
              "compile s"]
    lines = []
    for r in cell:
        lines.append([report.label(r["backend"]), r["dtype"],
                      report._cell_text(r, "median_ms"), report._cell_text(r, "iqr_ms"),
                      report._cell_text(r, "peak_mem_mb"), report._num(r["speedup_vs_eager"]),
                      report._num(r["speedup_vs_compile"]), report._num(r["compile_s"])])
    return report._render(header, lines, markdown)


def loss_mismatches(rows: List[report.Row]) -> List[str]:
    """Providers whose loss differs from the eager reference's on the same inputs (a sanity check)."""
    eager = {report.cell_key(r): r["loss_value"] for r in rows
             if r["backend"] == "reference" and report._finite(r["loss_value"])}
    problems = []
    for r in rows:
        base = eager.get(report.cell_key(r))
        tolerance = 1e-2 if r["dtype"] in ("float16", "bfloat16") else 1e-4
        if base is not None and report._finite(r["loss_value"]) and abs(r["loss_value"] - base) > tolerance:
            problems.append(f"{r['backend']} B={r['B']} C={r['C']} top_k={r['top_k']} {r['dtype']}: "
                            f"loss {r['loss_value']:.6g} vs eager {base:.6g}")
    return sorted(set(problems))


def write_outputs(out_dir: str, preset: Preset, rows: List[report.Row], e2e_rows: List[report.Row],
                  info: Dict[str, object], mem_cap_gb: float) -> None:
    markdown = []
    if rows:
        report.write_csv(os.path.join(out_dir, preset.csv_name), rows, report.COLUMNS)
        modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
        headline_text = headline_table(rows)
        if headline_text:
            print(f"\nHeadline: B={HEADLINE[0]}, C={HEADLINE[1]}, forward+backward through kendall_loss")
            print(headline_text)
            markdown += ["### Headline: B=256, C=1000, forward+backward", "", headline_table(rows, True), ""]
        for mode in modes:
            print(f"\n{mode} ({info['device']}; times are medians; x = speed-up; MB = peak extra memory)")
            print(report.mode_table(rows, mode))
            markdown += [f"### {mode}", "", report.mode_table(rows, mode, markdown=True), ""]
        if preset.csv_name == "results.csv":
            for path in report.write_plots(rows, out_dir, mem_cap_gb):
                print(f"wrote {os.path.relpath(path)}")
        problems = loss_mismatches(rows)
        if problems:
            print("\nWARNING: losses that disagree with the eager reference:\n  " + "\n  ".join(problems))
    if e2e_rows:
        report.write_csv(os.path.join(out_dir, "e2e.csv"), e2e_rows, report.E2E_COLUMNS)
        print("\nEnd-to-end: one ResNet-18 training step, cross-entropy + Kendall term")
        print(report.e2e_table(e2e_rows))
        markdown += ["### End-to-end: one ResNet-18 training step (CE + Kendall)", "",
                     report.e2e_table(e2e_rows, markdown=True), ""]
    if markdown:
        with open(os.path.join(out_dir, "tables.md" if preset.csv_name == "results.csv"
                               else preset.csv_name.replace(".csv", ".md")), "w") as out:
            out.write("\n".join(markdown) + "\n")
    info_name = "run_info.json" if preset.csv_name == "results.csv" else preset.csv_name.replace(".csv", "_info.json")
    with open(os.path.join(out_dir, info_name), "w") as out:
        json.dump(info, out, indent=2)


# ------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="CI smoke preset: small cells, < 2 min")
    which.add_argument("--headline", action="store_true",
                       help="only B=256, C=1000, forward+backward: time and memory side by side")
    which.add_argument("--e2e", action="store_true", help="only the ResNet-18 training-step figure")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=sorted(DTYPES))
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default %(default)s)")
    parser.add_argument("--mem-cap-gb", type=float, default=8.0,
                        help="skip reference cells estimated to need more (GB = 1e9 bytes)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled reference")
    parser.add_argument("--no-e2e", action="store_true", help="leave the end-to-end step out of a full run")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return 2
    if args.quick:
        preset = PRESETS["quick"]
    elif args.headline:
        preset = PRESETS["headline"]
    else:
        preset = PRESETS["gpu" if args.device == "cuda" else "full"]
    run_grid_now = not args.e2e
    run_e2e_now = args.e2e or (preset.e2e and not args.no_e2e)

    fast, absent = fast_backends(args.device)
    providers = ["reference"] + ([] if args.no_compile else ["reference_compiled"]) + fast
    os.makedirs(args.out, exist_ok=True)
    info = machine_info(args.device)
    info.update(command="python -m benchmarks.bench_kendall " + " ".join(argv if argv is not None else sys.argv[1:]),
                preset=preset.name if run_grid_now else "e2e", device=args.device, dtypes=args.dtype,
                providers=providers, absent_backends=absent, mem_cap_gb=args.mem_cap_gb)
    print(f"providers on {args.device}: {', '.join(report.label(p) for p in providers)}"
          + "".join(f"\n  {name} absent: {why}" for name, why in absent.items()))
    if not fast:
        print(f"WARNING: no fused backend runs on {args.device} here; only the references are measured")

    # One fresh Inductor cache for the run: compile_s is a cold compile, the same on every run.
    cache_dir = tempfile.mkdtemp(prefix="rkkd_bench_inductor_")
    env = {"TORCHINDUCTOR_CACHE_DIR": cache_dir}
    log_dir = os.path.join(args.out, "tmp")  # benchmarks/results/tmp/ is git-ignored
    os.makedirs(log_dir, exist_ok=True)
    timer = Worker(os.path.join(log_dir, "worker_timing.log"), env)
    # On a GPU the allocator's statistics are exact, so one process does both.
    memory_meter = timer if args.device == "cuda" else Worker(
        os.path.join(log_dir, "worker_memory.log"), {**env, **MEMORY_WORKER_ENV})
    for log in {timer.log_path, memory_meter.log_path}:
        open(log, "w").close()

    rows: List[report.Row] = []
    e2e_rows: List[report.Row] = []
    e2e_backends = ["reference"] + fast
    total = (len(preset.shapes) * len(providers) * len(args.dtype) + 2 * len(args.dtype)
             if run_grid_now else 0) + (len(e2e_backends) if run_e2e_now else 0)
    start = time.perf_counter()
    interrupted = False
    try:
        with tqdm(total=total, unit="cell", dynamic_ncols=True, file=sys.stderr) as progress:
            if run_grid_now:
                run_grid(preset, args.device, args.dtype, providers, timer, memory_meter,
                         args.mem_cap_gb, progress, rows)
            if run_e2e_now:
                e2e_rows = run_e2e(args.device, e2e_backends, timer, memory_meter, progress)
            progress.update(total - progress.n)
    except KeyboardInterrupt:  # Ctrl-C, or gpu_check.sh's time limit: write what was measured
        # `timeout` signals the process and then its group, so a second SIGINT follows the first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        interrupted = True
        print(f"\ninterrupted: writing the {len(rows)} rows measured so far", file=sys.stderr)
    finally:
        timer.close(kill=interrupted)
        memory_meter.close(kill=interrupted)
        shutil.rmtree(cache_dir, ignore_errors=True)
    report.add_speedups(rows)
    info["interrupted"] = interrupted
    info["wall_s"] = round(time.perf_counter() - start, 1)
    info["load_average_at_end"] = os.getloadavg()
    info["parallel_probe_at_end"] = parallel_probe()
    write_outputs(args.out, preset, rows, e2e_rows, info, args.mem_cap_gb)
    print(f"\n{info['wall_s']} s on {info['cpu_model']} ({info['cpu_cores']} cores"
          + (f", {info['gpu']}" if "gpu" in info else "")
          + f"; load average {info['load_average_at_start'][0]:.1f} at start, "
          f"{info['load_average_at_end'][0]:.1f} at end; {torch.get_num_threads()}-thread speed-up of "
          f"tanh {info['parallel_probe_at_start']['parallel_speedup']} at start, "
          f"{info['parallel_probe_at_end']['parallel_speedup']} at end); "
          f"results in {os.path.relpath(args.out)}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
