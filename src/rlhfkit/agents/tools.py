"""Tools: Python functions the model may call, named `package.module:function`, `path/to/file.py:function` or
a built-in's name (`calculator`, `python`).

Each tool's JSON schema is transformers' `get_json_schema` of the function (type hints → JSON types, the
Google-style docstring's summary and `Args:` → descriptions), the format `apply_chat_template(tools=...)`
takes. A function it cannot describe (no docstring, an argument without a type hint or description) is a
ConfigError naming the setting, as is a missing module, file or function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from transformers.utils import get_json_schema
from transformers.utils.chat_template_utils import DocstringParsingException, TypeHintParsingException

from ..errors import ConfigError
from ..rewards.sources import load_function

BUILTIN_TOOLS = {
    "calculator": "rlhfkit.agents.builtin_tools:calculator",
    "python": "rlhfkit.agents.builtin_tools:python",
}


@dataclass(frozen=True)
class Tool:
    """name: what the model calls it (the function's name); schema: {"type": "function", "function": {...}}."""

    name: str
    function: Callable
    schema: dict
    spec: str

    @property
    def parameters(self) -> dict:
        return self.schema["function"]["parameters"]


def load_tool(spec: str, setting: str, base_dir: str | Path | None = None) -> Tool:
    """A built-in's name, "package.module:function" or "path/to/file.py:function" (relative to base_dir, default
    the working directory) → the Tool; ConfigError naming the setting when it cannot be loaded or described."""
    if ":" not in spec and spec not in BUILTIN_TOOLS:
        raise ConfigError(f"{setting}: {spec!r} is not a built-in tool ({', '.join(BUILTIN_TOOLS)}) nor "
                          "\"package.module:function\" or \"path/to/file.py:function\"")
    fn = load_function(BUILTIN_TOOLS.get(spec, spec), setting, base_dir)
    try:
        schema = get_json_schema(fn)
    except (DocstringParsingException, TypeHintParsingException) as e:
        raise ConfigError(f"{setting}: cannot describe {spec!r} to the model: {e} (a tool needs a docstring whose "
                          "Args: section describes every argument, and a type hint on every argument)") from None
    return Tool(schema["function"]["name"], fn, schema, spec)


def load_tools(specs: list[str], setting: str, base_dir: str | Path | None = None) -> dict[str, Tool]:
    """Each spec of the list loaded, keyed by tool name; ConfigError when two tools share a name."""
    tools: dict[str, Tool] = {}
    for i, spec in enumerate(specs):
        tool = load_tool(spec, f"{setting}[{i}]", base_dir)
        if tool.name in tools:
            raise ConfigError(f"{setting}[{i}]: {spec!r} is named {tool.name!r}, as {tools[tool.name].spec!r} is; "
                              "the model calls tools by name, so names must differ")
        tools[tool.name] = tool
    return tools


_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def check_arguments(tool: Tool, arguments: dict) -> str | None:
    """Why `arguments` (a call's parsed JSON object) do not fit the tool's parameters, or None when they do:
    a missing required argument, one the tool does not take, or a value of the wrong JSON type."""
    params = tool.parameters
    properties = params.get("properties", {})
    missing = [p for p in params.get("required", []) if p not in arguments]
    if missing:
        return f"missing required argument{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}"
    extra = [a for a in arguments if a not in properties]
    if extra:
        return (f"{tool.name} takes no argument{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))} "
                f"(its arguments: {', '.join(map(repr, properties)) or 'none'})")
    for name, value in arguments.items():
        problem = _value_problem(properties[name], value)
        if problem:
            return f"argument {name!r}: {problem}"
    return None


def _value_problem(schema: dict, value) -> str | None:
    """The subset of JSON schema that get_json_schema writes: type (one or a list), nullable, enum, anyOf,
    items, prefixItems, additionalProperties."""
    if value is None and schema.get("nullable"):
        return None
    if "enum" in schema and value not in schema["enum"]:
        return f"{_short(value)} is not one of {schema['enum']}"
    if "anyOf" in schema:
        if all(_value_problem(s, value) for s in schema["anyOf"]):
            return f"{_short(value)} matches none of the allowed types"
        return None
    expected = schema.get("type")
    if expected is not None:
        names = expected if isinstance(expected, list) else [expected]
        if not any(_JSON_TYPES.get(t, lambda v: False)(value) for t in names):
            return f"expected {' or '.join(names)}, got {_json_type(value)} {_short(value)}"
    if isinstance(value, list):
        prefix = schema.get("prefixItems")  # a tuple's items, one schema each
        if prefix is not None and len(value) != len(prefix):
            return f"expected {len(prefix)} items, got {len(value)}"
        for i, item in enumerate(value):
            item_schema = prefix[i] if prefix is not None else schema.get("items")
            problem = _value_problem(item_schema, item) if item_schema else None
            if problem:
                return f"item {i}: {problem}"
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            problem = _value_problem(schema["additionalProperties"], item)
            if problem:
                return f"key {key!r}: {problem}"
    return None


def _json_type(value) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
