"""Imports point one way: rkkd_kernels <- benchmarks/ <- train/.

benchmarks/ never imports train/, and both use only the package's public names: those of
``rkkd_kernels.__all__`` and the public modules named in its docstring. Python files and the shell
scripts' embedded Python are read as text.
"""

from __future__ import annotations

import glob
import os
import re

import rkkd_kernels
from conftest import REPO_ROOT

PUBLIC = set(rkkd_kernels.__all__) | {"__version__", "expsum", "triton_tools"}
# (benchmarks/sass_loop.py takes the CUDA kernel's nvcc flags from setup.py, where the build keeps
# them, not from the package.)
KNOWN_PRIVATE: set = set()

FROM_PACKAGE = re.compile(r"from rkkd_kernels import (?:\(([^)]*)\)|([^(#\n]+))")
DOTTED = re.compile(r"\brkkd_kernels\.(\w+)")
TRAIN_IMPORT = re.compile(r"^\s*(?:from|import) train\b", re.M)


def _sources(folder: str):
    for path in sorted(glob.glob(os.path.join(REPO_ROOT, folder, "**", "*"), recursive=True)):
        if path.endswith((".py", ".sh")):
            with open(path) as f:
                yield os.path.relpath(path, REPO_ROOT), f.read()


def names_used(text: str) -> set:
    """The rkkd_kernels names a source imports or reaches for."""
    names = set(DOTTED.findall(text))
    for groups in FROM_PACKAGE.findall(text):
        names |= {part.split(" as ")[0].strip() for part in "".join(groups).split(",") if part.strip()}
    return names


def test_names_used_sees_every_form():
    text = ("from rkkd_kernels import kendall_loss, backends\nimport rkkd_kernels._ext\n"
            "from rkkd_kernels import (\n    ops,\n    dtypes as d,\n)\n")
    assert names_used(text) == {"kendall_loss", "backends", "_ext", "ops", "dtypes"}


def test_benchmarks_do_not_import_train():
    offenders = [path for path, text in _sources("benchmarks") if TRAIN_IMPORT.search(text)]
    assert not offenders


def test_tools_use_only_public_names_of_the_package():
    private = {(path, name) for folder in ("benchmarks", "train") for path, text in _sources(folder)
               for name in names_used(text) if name not in PUBLIC}
    assert private == KNOWN_PRIVATE
