"""Two checkouts' CPU kernels against each other, interleaved in one run.

    python -m benchmarks.compare_builds OLD_ROOT NEW_ROOT [--rounds 20] [--threads N]

Each checkout runs in a persistent process of its own (its package first on PYTHONPATH; a checkout
whose kernels are built on first use keeps them in its own cache folder, RKKD_CACHE_DIR=ROOT/.cache;
a checkout of the stable-ABI build must have been built, `make build`). Every round times both, in alternating order, so that a machine's load drifts over both:
the headline cell (B=256, C=1000, float32, forward + backward through kendall_loss), the op alone
(forward with the student's gradient) and a (1, 2) call. Prints the medians over rounds and the
new/old ratios. Both processes use the same torch (this interpreter's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CASES = {"headline": 5, "op": 5, "tiny": 2000}  # calls per timing


def worker() -> None:
    """Reads "CASE N" lines, times N calls of CASE, prints the seconds."""
    import torch

    from rkkd_kernels import kendall_loss

    torch.manual_seed(0)
    if os.environ.get("COMPARE_THREADS"):
        torch.set_num_threads(int(os.environ["COMPARE_THREADS"]))
    big_s, big_t = torch.randn(256, 1000, requires_grad=True), torch.randn(256, 1000)
    tiny_s, tiny_t = torch.randn(1, 2, requires_grad=True), torch.randn(1, 2)
    cases = {
        "headline": lambda: kendall_loss(big_s, big_t, backend="cpu").backward(),
        "op": lambda: torch.ops.rkkd.kendall(big_s.detach(), big_t, 1.0, False, True, False),
        "tiny": lambda: kendall_loss(tiny_s, tiny_t, backend="cpu"),
    }
    for fn in cases.values():  # warm up
        for _ in range(3):
            fn()
    print("ready", flush=True)
    for line in sys.stdin:
        name, calls = line.split()
        start = time.perf_counter()
        for _ in range(int(calls)):
            cases[name]()
        print(time.perf_counter() - start, flush=True)


def start(root: str, threads) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=root, RKKD_CACHE_DIR=os.path.join(root, ".cache"))
    env.pop("TRITON_INTERPRET", None)
    if threads:
        env["COMPARE_THREADS"] = str(threads)
    # Run as a file from the checkout's root: its package, not this one's, comes first.
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            cwd=root)
    assert proc.stdout.readline().strip() == "ready", f"the worker of {root} did not start"
    return proc


def per_call(proc: subprocess.Popen, name: str) -> float:
    proc.stdin.write(f"{name} {CASES[name]}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline()) / CASES[name]


def main() -> None:
    if "--worker" in sys.argv:
        worker()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    procs = {"old": start(os.path.abspath(args.old), args.threads),
             "new": start(os.path.abspath(args.new), args.threads)}
    times = {(side, name): [] for side in procs for name in CASES}
    for r in range(args.rounds):
        for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
            for name in CASES:
                times[side, name].append(per_call(procs[side], name))
    for name in CASES:
        old, new = (statistics.median(times[side, name]) for side in ("old", "new"))
        print(f"{name:>8}: old {old * 1e3:.3f} ms, new {new * 1e3:.3f} ms per call, "
              f"new/old {new / old:.3f} (medians over {args.rounds} rounds)")


if __name__ == "__main__":
    main()
