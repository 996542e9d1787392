"""Safe arithmetic: evaluates an expression by walking its syntax tree, never with ``eval``.

Pure standard library and deterministic. The runtime calls :func:`handle` with
``{"intent", "input", "params", "state"}`` and gets ``{"output", "state"}`` back.

Allowed: int and float literals, ``+ - * / // % **``, unary ``-`` and ``+``, parentheses.
Refused (``ValueError``): names, calls, attributes, any other syntax, division by zero,
exponents beyond ``max_exponent``, and results too large or not finite.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}

MAX_EXPRESSION = 1000  # characters
MAX_BITS = 4096  # largest integer result, in bits
MAX_DEPTH = 200  # deepest nesting of operators


class Evaluator:
    """Evaluates one parsed expression under an exponent cap."""

    def __init__(self, max_exponent: int) -> None:
        self.max_exponent = max_exponent

    def value(self, node: ast.AST, depth: int = 0) -> Number:
        """The value of ``node``, or ValueError naming what is not allowed."""
        if depth > MAX_DEPTH:
            raise ValueError(f"expression nested too deeply (more than {MAX_DEPTH} levels)")
        if isinstance(node, ast.Expression):
            return self.value(node.body, depth + 1)
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float):
                raise ValueError(f"{type(node.value).__name__} literals are not allowed, only numbers")
            return self.checked(node.value)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return self.checked(_UNARY[type(node.op)](self.value(node.operand, depth + 1)))
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = self.value(node.left, depth + 1), self.value(node.right, depth + 1)
            if isinstance(node.op, ast.Pow):
                self.check_power(left, right)
            if isinstance(node.op, ast.Div | ast.FloorDiv | ast.Mod) and right == 0:
                raise ValueError("division by zero")
            try:
                return self.checked(_BINARY[type(node.op)](left, right))
            except OverflowError:
                raise ValueError("result too large") from None
        if isinstance(node, ast.Name | ast.Call | ast.Attribute):
            raise ValueError(f"{type(node).__name__.lower()}s are not allowed, only numbers and operators")
        raise ValueError(f"{type(node).__name__} is not allowed, only numbers and + - * / // % ** ( )")

    def check_power(self, base: Number, exponent: Number) -> None:
        """Refuse exponents beyond the cap, and integer powers whose result would be huge."""
        if abs(exponent) > self.max_exponent:
            raise ValueError(f"exponent {exponent} is larger than {self.max_exponent}")
        if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 \
                and base.bit_length() * exponent > MAX_BITS:
            raise ValueError("result too large")
        if base == 0 and exponent < 0:
            raise ValueError("division by zero")
        if base < 0 and isinstance(exponent, float) and not exponent.is_integer():
            raise ValueError("a negative number to a fractional power is not a real number")

    @staticmethod
    def checked(value: Any) -> Number:
        """``value`` if it is a finite real number of bounded size."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_BITS:
                raise ValueError("result too large")
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise ValueError("result is not a finite real number")


def evaluate(expression: str, max_exponent: int = 100) -> Number:
    """The value of an arithmetic ``expression``."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an arithmetic expression: {e.msg}") from None
    return Evaluator(max_exponent).value(tree)


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Run one task: intent ``evaluate``, input ``{expression}``, output ``{value}``."""
    intent = request.get("intent")
    if intent != "evaluate":
        raise ValueError(f"unknown intent {intent!r}: this agent only evaluates expressions")
    params = request.get("params") or {}
    value = evaluate(str((request.get("input") or {})["expression"]), int(params.get("max_exponent", 100)))
    return {"output": {"value": value}}
