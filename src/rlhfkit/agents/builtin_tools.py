"""The built-in tools, named `calculator` and `python` in a tool list.

The calculator evaluates arithmetic by walking its syntax tree (`ast`), never `eval`: numbers, + - * / // %
**, parentheses and a few functions and constants, nothing else. The python tool runs code in a separate,
limited process (sandbox.py). Both raise ValueError with a message for the model where they cannot answer;
the runner turns it into an error observation.
"""

from __future__ import annotations

import ast
import math
import operator

from .sandbox import Limits, run_python

MAX_EXPRESSION_CHARS = 500
MAX_DIGITS = 1000  # an integer result past this many digits is refused (9**9**9 would take minutes)
_TOO_LARGE = 10 ** MAX_DIGITS

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "floor": math.floor,
              "ceil": math.ceil, "log": math.log, "log10": math.log10, "exp": math.exp}
_CONSTANTS = {"pi": math.pi, "e": math.e}
# what people (and models) write for the operators: ^ for a power, as on a calculator, not Python's xor
_SPELLINGS = {"×": "*", "÷": "/", "−": "-", "^": "**"}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression and return its value.

    Args:
        expression: The expression, e.g. "(12 + 30) * 4 / 7" or "sqrt(2) ** 3". Numbers, + - * / // % and ** (or ^), parentheses, the functions sqrt, abs, round, min, max, floor, ceil, log, log10, exp and the constants pi and e.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    text = expression
    for spelling, op in _SPELLINGS.items():
        text = text.replace(spelling, op)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as arithmetic") from None
    try:
        value = _evaluate(tree.body)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("the result is too large") from None
    return _format(value)


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and _too_many_digits(left, right):
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS:
        if node.keywords:
            raise ValueError(f"{node.func.id}() takes no named arguments")
        args = [_evaluate(a) for a in node.args]
        try:
            return _checked(_FUNCTIONS[node.func.id](*args))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{node.func.id}({', '.join(map(repr, args))}): {e}") from None
    name = node.func if isinstance(node, ast.Call) else node
    if isinstance(name, ast.Name):
        raise ValueError(f"unknown name {name.id!r}; the functions are {', '.join(_FUNCTIONS)} and the constants "
                         f"{', '.join(_CONSTANTS)}")
    raise ValueError(f"{ast.unparse(node)!r} is not arithmetic this calculator does")


def _too_many_digits(base, exponent) -> bool:
    if not (isinstance(base, int) and isinstance(exponent, int)) or exponent <= 0 or abs(base) <= 1:
        return False
    return exponent * math.log10(abs(base)) > MAX_DIGITS


def _checked(value):
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is too large")
    if isinstance(value, int) and abs(value) >= _TOO_LARGE:
        raise ValueError(f"the result has more than {MAX_DIGITS} digits")
    return value


def _format(value) -> str:
    """An integer as it is; a float with 12 significant digits, written as an integer when it is one."""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return format(value, ".12g")
    return str(value)


def python(code: str) -> str:
    """Run a Python program in a separate process and return what it printed (stdout, then stderr).

    Args:
        code: The program. Print what you want to see; the value of a final expression is printed too. No network; limited time, memory and output.
    """
    run = run_python(code)
    limits = Limits()
    notes = {"wall_time": f"[stopped: still running after {limits.wall_seconds:g} s]",
             "cpu_time": f"[stopped: used more than {limits.cpu_seconds} s of CPU time]",
             "output": f"[stopped: printed more than {limits.output_bytes} bytes]"}
    parts = [p for p in (run.stdout, run.stderr, notes.get(run.stopped, "")) if p]
    return "\n".join(p.rstrip("\n") for p in parts) if parts else "(no output)"
