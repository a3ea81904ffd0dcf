"""The child process that runs the measurements, and the parent's handle on it.

The parent (bench_kendall.py) sends one JSON request per line on the child's stdin and reads one JSON
reply per line from its stdout; the child's stderr (and any stray print) goes to a log file. A child
that dies (for instance killed for memory) costs one reply, marked as an error, and is restarted.

Why a child process at all: peak resident-set growth is a property of a whole process, so it is
measured where nothing else (plots, tables, progress bar) allocates. On the CPU the benchmark keeps two
children: one times (with glibc's usual allocator settings, as users run), the other measures memory
with glibc's mmap threshold lowered, so that each buffer the loss allocates is fresh pages that show in
the resident set, instead of memory that an earlier call freed and glibc kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any, Dict, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# glibc: allocations from 16 KiB up are mmap'ed and given back on free (fixing the threshold also
# stops glibc from raising it dynamically); free memory at the top of the heap is trimmed at once.
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0"}


class Worker:
    """A measuring child process (``python -m benchmarks.worker``)."""

    def __init__(self, log_path: str, extra_env: Optional[Dict[str, str]] = None) -> None:
        self.log_path = log_path
        self.env = dict(os.environ)
        self.env.pop("TRITON_INTERPRET", None)  # benchmarks time native kernels, never the interpreter
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p
        )
        self.env.update(extra_env or {})
        self.process: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=REPO_ROOT,
            env=self.env,
            text=True,
            bufsize=1,
        )
        log.close()
        return self.process

    def request(self, kind: str, spec: Any) -> Dict[str, Any]:
        """Run ``kind`` ("times", "memory", "e2e_times", "e2e_memory") on a Spec or E2ESpec."""
        process = self.process if self.process and self.process.poll() is None else self._start()
        message = {"kind": kind, "spec": dataclasses.asdict(spec)}
        try:
            process.stdin.write(json.dumps(message) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = process.wait()
            self.process = None
            why = " (killed: likely out of memory)" if code in (-9, 137) else ""
            return {"status": f"error: the worker exited with code {code}{why}; see {self.log_path}"}
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        """End the child: let it finish its request and exit, or (kill) stop it at once."""
        if self.process and self.process.poll() is None:
            if kill:
                self.process.kill()
                self.process.wait()
            else:
                self.process.stdin.close()
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.process.kill()
        self.process = None


def _serve() -> None:
    """The child's loop: one request in, one reply out, errors reported instead of raised."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to the log, not the protocol

    from . import e2e, measure

    handlers = {
        "times": (measure.Spec, measure.measure_times),
        "memory": (measure.Spec, measure.measure_memory),
        "e2e_times": (e2e.E2ESpec, e2e.measure_e2e_times),
        "e2e_memory": (e2e.E2ESpec, e2e.measure_e2e_memory),
    }
    for line in sys.stdin:
        request = json.loads(line)
        spec_type, handler = handlers[request["kind"]]
        spec = spec_type(**request["spec"])
        try:
            reply = handler(spec)
            reply["status"] = "ok"
        except Exception as err:  # noqa: BLE001  (one failed cell must not end the benchmark)
            first_line = (str(err).splitlines() or [""])[0][:200]
            reply = {"status": f"error: {type(err).__name__}: {first_line}"}
            print(f"{request}: {err!r}", file=sys.stderr)
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()


if __name__ == "__main__":
    _serve()
