"""The numbers that Python (and through it Triton) and C++ both hold are the same numbers.

Python has one definition of each (rkkd_kernels/row_paths.py for the row forms' spread limits,
rkkd_kernels/expsum.py for the exponential-sum lattice); the C++ headers cannot import them, so this
reads csrc/pair_math.h and csrc/expsum.h and fails on the first value that differs.
"""

from __future__ import annotations

import ast
import operator
import os
import re

import pytest
import torch

from conftest import REPO_ROOT
from rkkd_kernels import expsum, row_paths

CPP_TYPES = {"float": torch.float32, "double": torch.float64}
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _header(name: str) -> str:
    with open(os.path.join(REPO_ROOT, "csrc", name)) as f:
        return f.read()


def cpp_number(text: str) -> float:
    """A C++ constant expression of literals and + - * / (``7.0 / 16.0``, ``80.0f``) as a float."""

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        raise ValueError(f"not a constant expression of literals: {text!r}")

    without_suffixes = re.sub(r"(?<=[0-9.])[fF]\b", "", text)
    try:
        tree = ast.parse(without_suffixes.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"not a constant expression of literals: {text!r}") from None
    return value(tree.body)


def specializations(header: str, template: str) -> dict:
    """{torch dtype: {member: value}} of each ``template<float>`` / ``template<double>`` struct."""
    found = {}
    for cpp_type, body in re.findall(rf"struct {template}<(float|double)>\s*\{{(.*?)\}};", header, re.S):
        members = re.findall(r"static constexpr \w+ (\w+) = ([^;]+);", body)
        found[CPP_TYPES[cpp_type]] = {name: cpp_number(expr) for name, expr in members}
    return found


def test_cpp_number_reads_the_headers_forms():
    assert cpp_number("7.0 / 16.0") == 0.4375
    assert cpp_number("80.0f") == 80.0
    assert cpp_number("1e-8") == 1e-8
    with pytest.raises(ValueError):
        cpp_number("std::log(2.0)")


def test_small_spread_limit_matches_pair_math_h():
    match = re.search(r"constexpr double kSmallSpreadMax = ([^;]+);", _header("pair_math.h"))
    assert match, "kSmallSpreadMax is no longer defined in csrc/pair_math.h"
    assert cpp_number(match.group(1)) == row_paths.SMALL_SPREAD_MAX


def test_ratio_limits_match_pair_math_h():
    limits = specializations(_header("pair_math.h"), "RatioLimits")
    assert set(limits) == set(row_paths.RATIO_MAX_SPREAD)
    for dtype, members in limits.items():
        assert members == {"max_spread": row_paths.RATIO_MAX_SPREAD[dtype]}, dtype


def test_expsum_lattice_matches_expsum_h():
    lattices = specializations(_header("expsum.h"), "ExpsumLattice")
    assert set(lattices) == set(expsum.LATTICES)
    for dtype, members in lattices.items():
        lattice = expsum.LATTICES[dtype]
        assert members == {"step": lattice.step, "cut": lattice.cut, "max_spread": lattice.max_spread}, dtype
