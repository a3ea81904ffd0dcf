#!/usr/bin/env bash
# One GPU window verifies everything: on a machine with a CUDA GPU,
#   1. put the compiled kernels in place: those of a wheel built elsewhere (RKKD_WHEEL, the safer
#      way: the wheel built and tested here, carried to the GPU machine), else an in-place build,
#   2. run the whole test suite on CUDA tensors (conftest picks CUDA when a GPU is present),
#   3. run both GPU backends under compute-sanitizer (memcheck, racecheck, initcheck, synccheck)
#      while the tests' Triton kernels are still in the cache,
#   4. report the Triton autotuner's choices,
#   5. run the GPU benchmark: the headline cell (B=256, C=1000) first, with the verdict on the CUDA
#      extension's time against Triton's, then the GPU grid with what is left of the budget,
# writing logs, CSV and summary.txt into the folder given as the first argument, in under 10 min.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [COPY_DIR]
#
# COPY_DIR (optional): after every step, summary.txt and an archive of OUT_DIR (gpu_check.tgz) are
# copied there, so that a run killed at an outer time limit still leaves what it had done.
#
# Environment: PYTHON (default: python3), MAX_JOBS (default: the number of CPUs), RKKD_WHEEL (a
# wheel of this commit whose kernels to use, e.g. dist/rkkd_kernels-*.whl from `make wheel`),
# GPU_CHECK_BUDGET_S (default 570: the whole run), GPU_CHECK_DRY_RUN=1 (print the steps only),
# GPU_CHECK_STEPS="NAME ..." (run only these steps, e.g. a second call on the same, still warm
# machine: "sanitizer_memcheck sanitizer_racecheck bench_gpu"; the build is kept there).
# Every step runs under a timeout cut to what is left of the budget, and a failing step does not
# stop the next ones; summary.txt lists each step's exit status and seconds (124: timed out).
#
# Where only a few files can be brought back, run it in a scratch folder with COPY_DIR:
#   bash benchmarks/gpu_check.sh /tmp/gc "$OUT"
#
# To add a step (e.g. the CUDA extension's own runs), call `step NAME CAP_S COMMAND...` below:
# its output goes to OUT_DIR/NAME.log.

set -u -o pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR" >&2
    exit 2
fi
OUT_DIR=$1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
COPY_DIR=${2:-}
if [ -n "$COPY_DIR" ]; then
    mkdir -p "$COPY_DIR"
    COPY_DIR=$(cd "$COPY_DIR" && pwd)
fi
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-570}
START_S=$SECONDS
SUMMARY="$OUT_DIR/summary.txt"
FAILED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real GPU kernels, not the interpreter

: >"$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# The steps' caps (seconds). Those before the grid sum to CAPPED_S, within the budget; the grid
# (bench_gpu, the last step) gets what is left, and writes the cells it measured when cut.
CAP_ENVIRONMENT=15 CAP_BUILD=180 CAP_TESTS=150 CAP_SANITIZER=25 CAP_TRITON_CONFIGS=40
CAP_BENCH_HEADLINE=60 CAP_CUDA_VS_TRITON=10
SANITIZERS="memcheck racecheck initcheck synccheck"
CAPPED_S=$((CAP_ENVIRONMENT + CAP_BUILD + CAP_TESTS + 4 * CAP_SANITIZER + CAP_TRITON_CONFIGS
            + CAP_BENCH_HEADLINE + CAP_CUDA_VS_TRITON))

# After every step: summary.txt and an archive of the logs into COPY_DIR (if given).
copy_out() {
    [ -n "$COPY_DIR" ] || return 0
    cp "$SUMMARY" "$COPY_DIR/summary.txt"
    tar czf "$COPY_DIR/gpu_check.tgz.part" -C "$(dirname "$OUT_DIR")" "$(basename "$OUT_DIR")" 2>/dev/null \
        && mv "$COPY_DIR/gpu_check.tgz.part" "$COPY_DIR/gpu_check.tgz"
}

# step NAME CAP_S COMMAND...: run COMMAND with a timeout of min(CAP_S, budget left), log to NAME.log.
step() {
    local name=$1 cap=$2
    shift 2
    if [ -n "${GPU_CHECK_STEPS:-}" ] && [[ " $GPU_CHECK_STEPS " != *" $name "* ]]; then
        return 0  # not selected
    fi
    local left=$((BUDGET_S - (SECONDS - START_S)))
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -lt 10 ]; then
        note "SKIPPED $name: ${left}s of the budget left"
        FAILED=1
        copy_out
        return 0
    fi
    echo "== $name (at most ${limit}s): $*"
    if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
        note "DRY-RUN $name"
        return 0
    fi
    local t0=$SECONDS status
    # SIGINT first, so that pytest and the benchmark still print (and write) what they have.
    timeout -s INT -k 20 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    status=$?
    [ "$status" -eq 0 ] || FAILED=1
    note "$(printf '%-22s exit %3d  %4ds' "$name" "$status" $((SECONDS - t0)))"
    tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/    /'
    copy_out
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
note "caps before the grid: ${CAPPED_S}s of a ${BUDGET_S}s budget"
if [ "$CAPPED_S" -gt "$BUDGET_S" ]; then
    note "WARNING: the caps exceed the budget; the last steps will be cut or skipped"
fi
ENV_INFO='import sys, torch, triton
print(sys.version)
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")'
step environment "$CAP_ENVIRONMENT" bash -c "nvidia-smi; $PY -c '$ENV_INFO'"

# The kernels into rkkd_kernels/, where the clone's package (first on PYTHONPATH) loads them: the
# wheel's libraries (one abi3 binary for every torch >= 2.10, so the wheel built on a CPU machine
# serves this GPU machine's torch), else built here (RKKD_BUILD_CUDA=1: the step fails without the
# CUDA kernel); then the installation's report.
if [ -n "${RKKD_WHEEL:-}" ]; then
    step build "$CAP_BUILD" bash -c "rm -rf '$OUT_DIR/wheel' && $PY -m zipfile -e '$RKKD_WHEEL' '$OUT_DIR/wheel' \
        && cp '$OUT_DIR'/wheel/rkkd_kernels/*.so '$OUT_DIR'/wheel/rkkd_kernels/_build_info.json rkkd_kernels/ \
        && $PY -m rkkd_kernels"
else
    step build "$CAP_BUILD" bash -c "MAX_JOBS=${MAX_JOBS:-$(nproc)} RKKD_BUILD_CUDA=1 $PY setup.py build_ext --inplace \
        && $PY -m rkkd_kernels"
fi

# The CPU-only files stay out of the GPU window: the ahead-of-time compile check (Triton's compiler,
# no GPU needed) and the CPU benchmark's smoke test run in every CI run.
step tests "$CAP_TESTS" "$PY" -m pytest tests -ra -q --junitxml="$OUT_DIR/tests.xml" \
    --ignore=tests/test_triton_aot.py --ignore=tests/test_bench.py

# What the tests' results alone could miss, in both GPU backends: out-of-bounds accesses
# (memcheck), shared-memory races (racecheck), reads of uninitialised global memory (initcheck),
# misused barriers (synccheck). On a few shapes that take every path: one and several blocks or
# programs per row, partial tiles, hard teacher, rows of each form (small spread, ratio, direct)
# and a NaN row. Without the caching allocator (PYTORCH_NO_CUDA_MEMORY_CACHING=1): inside one of
# its blocks an access past a tensor's end is in bounds to the sanitizer. One pinned Triton
# configuration, compiled by the tests just before: no autotuning or compiling under the tool.
cat >"$OUT_DIR/sanitized_calls.py" <<'PYEOF'
import torch
from rkkd_kernels import kendall_loss

for backend in ("cuda", "triton"):
    for rows, c in [(3, 33), (1, 1000), (300, 100), (5, 4099)]:
        for hard in (False, True):
            # Row spreads from 1e-7 to 100 (every form of row at k = 1), and a NaN row.
            s = torch.randn(rows, c, device="cuda") * torch.logspace(-7, 2, rows, device="cuda")[:, None]
            if rows > 1:
                s[-1, -1] = float("nan")
            s.requires_grad_(True)
            t = torch.randn(rows, c, device="cuda", requires_grad=not hard)
            kendall_loss(s, t, 1.0, hard_teacher=hard, backend=backend).backward()
torch.cuda.synchronize()
print("all calls ran")
PYEOF
for tool in $SANITIZERS; do
    step "sanitizer_$tool" "$CAP_SANITIZER" env RKKD_TRITON_CONFIG=64:8 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" "$OUT_DIR/sanitized_calls.py"
done

# The Triton autotuner's pick (tile, warps) and the number of splits per shape; the timings are
# the benchmark's (next steps).
step triton_configs "$CAP_TRITON_CONFIGS" "$PY" - <<'PYEOF'
import torch

from rkkd_kernels import available_backends, triton_tools

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
print("device", device, "available backends:", available_backends())


def sync():
    if cuda:
        torch.cuda.synchronize()


# Which tile and warps the autotuner picks, per (rows, C), student gradient only.
shapes = [(256, 100), (256, 1000), (256, 4096), (32, 1024), (8, 32000)] if cuda else [(4, 40)]
for rows, cols in shapes:
    s = torch.randn(rows, cols, device=device)
    torch.ops.rkkd.kendall_triton(s, torch.randn_like(s), 1.0, False, True, False)
    sync()
    print(f"rows={rows} C={cols} splits={triton_tools.splits_per_row(rows, cols, s.device)}")
for key, config in triton_tools.autotuned_configs().items():
    print("autotuned", key, "->", config)
PYEOF

step bench_headline "$CAP_BENCH_HEADLINE" "$PY" -m benchmarks.bench_kendall --device cuda --headline \
    --out "$OUT_DIR/bench_headline"

# The target: the CUDA extension within 1.5x of the Triton kernel at the headline cell.
step cuda_vs_triton "$CAP_CUDA_VS_TRITON" "$PY" - "$OUT_DIR/bench_headline/headline.csv" <<'PYEOF'
import csv, sys
ms = {r["backend"]: float(r["median_ms"]) for r in csv.DictReader(open(sys.argv[1])) if r.get("median_ms")}
ratio = ms["cuda"] / ms["triton"]
print(f"cuda {ms['cuda']:.3f} ms, triton {ms['triton']:.3f} ms: cuda/triton {ratio:.2f} (target <= 1.5)")
sys.exit(0 if ratio <= 1.5 else 1)
PYEOF

step bench_gpu "$BUDGET_S" "$PY" -m benchmarks.bench_kendall --device cuda --out "$OUT_DIR/bench"

note "total $((SECONDS - START_S))s of a ${BUDGET_S}s budget; logs and CSV in $OUT_DIR"
exit $FAILED
