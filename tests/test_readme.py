"""The examples a user reads run as printed: the README's first ```python block, in a fresh
interpreter on the CPU, and the examples of the public docstrings that help() shows."""

import doctest
import os
import re
import subprocess
import sys

from conftest import REPO_ROOT, tool_env
from rkkd_kernels import loss, reference

README = os.path.join(REPO_ROOT, "README.md")


def first_python_block(text: str) -> str:
    """The body of the first fenced block opened with ```python, or an AssertionError."""
    match = re.search(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.MULTILINE | re.DOTALL)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_first_python_block_is_found():
    text = "intro\n```bash\nmake test\n```\n```python\nx = 1\n```\n```python\ny = 2\n```\n"
    assert first_python_block(text) == "x = 1\n"


def test_readme_example_runs():
    with open(README, encoding="utf-8") as f:
        code = first_python_block(f.read())
    assert "kendall_loss" in code and "backward()" in code, "the first python block is not the example"
    env = tool_env()
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU backend, whatever the machine has
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"the README's example failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    values = dict(re.findall(r"(ce|kd|kendall) (-?\d+\.\d+)", proc.stdout))
    assert set(values) == {"ce", "kd", "kendall"}, f"unexpected output: {proc.stdout!r}"
    assert 0.0 <= float(values["kendall"]) <= 2.0


def test_docstring_examples_run():
    """help(kendall_loss), help(KendallLoss) and help(kendall_reference_rows) show examples; they run
    as shown (CPU tensors, so the CPU kernel and the reference)."""
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    examples = 0
    for obj in (loss.kendall_loss, loss.KendallLoss, reference.kendall_reference_rows):
        for test in finder.find(obj, globs={}):
            examples += len(test.examples)
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert examples >= 10, f"only {examples} docstring examples found"
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples failed"
