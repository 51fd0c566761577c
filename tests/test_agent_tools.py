"""Tools (loading, schemas, argument checks), the <tool_call> format, the runner's error observations and
deadline, and the calculator."""

import copy
import json
import re
import textwrap
import time

import pytest

from rlhfkit.agents.builtin_tools import calculator
from rlhfkit.agents.calls import (BadCall, ToolCall, parse_tool_calls, template_takes_tools, tool_instructions,
                                  tool_message, with_tool_instructions)
from rlhfkit.agents.runner import ERROR_KINDS, run_calls, still_running
from rlhfkit.agents.tools import check_arguments, load_tool, load_tools
from rlhfkit.errors import ConfigError

TOOLS_PY = textwrap.dedent('''
    import time

    def add(a: int, b: float = 1.0) -> float:
        """Add two numbers.

        Args:
            a: The first number.
            b: The second number.
        """
        return a + b

    def tag(words: list[str], mode: str | None = None, scale: tuple[int, str] = (1, "x")) -> dict:
        """Tag words.

        Args:
            words: The words.
            mode: How to tag them (choices: ["upper", "lower"])
            scale: A pair.
        """
        return {"tags": [w.upper() for w in words]}

    def fail(x: int) -> str:
        """Always fails.

        Args:
            x: Ignored.
        """
        raise RuntimeError(f"broken on {x}")

    def hang(seconds: float) -> str:
        """Sleeps.

        Args:
            seconds: How long.
        """
        time.sleep(seconds)
        return "woke"

    def undocumented(x: int) -> int:
        return x

    def no_hint(x) -> int:
        """No hint.

        Args:
            x: A value.
        """
        return x

    NOT_CALLABLE = 3
''')


@pytest.fixture
def tools_file(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(TOOLS_PY)
    return path


@pytest.fixture
def tools(tools_file):
    return load_tools([f"{tools_file}:add", f"{tools_file}:tag", f"{tools_file}:fail", f"{tools_file}:hang",
                       "calculator"], "ppo.tools")


# --- loading and schemas ---

def test_schema_from_signature_and_docstring(tools_file):
    tool = load_tool(f"{tools_file}:add", "ppo.tools[0]")
    assert tool.name == "add"
    assert tool.schema["type"] == "function"
    fn = tool.schema["function"]
    assert fn["description"] == "Add two numbers."
    assert fn["parameters"]["properties"] == {"a": {"type": "integer", "description": "The first number."},
                                              "b": {"type": "number", "description": "The second number."}}
    assert fn["parameters"]["required"] == ["a"]


def test_tool_loads_by_module_name_relative_file_and_builtin_name(tools_file, monkeypatch):
    monkeypatch.syspath_prepend(str(tools_file.parent))
    assert load_tool("my_tools:add", "ppo.tools[0]").function(2, 3) == 5
    assert load_tool("my_tools.py:add", "ppo.tools[0]", base_dir=tools_file.parent).name == "add"
    assert load_tool("calculator", "ppo.tools[0]").name == "calculator"
    assert load_tool("python", "ppo.tools[0]").name == "python"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    ("missing.py:fn", "not found"),
    ("{file}:nothing", "has no function 'nothing'"),
    ("{file}:NOT_CALLABLE", "is not a function"),
    ("{file}:undocumented", "has no docstring"),
    ("{file}:no_hint", "missing a type hint"),
    ("calculater", "is not a built-in tool"),
])
def test_bad_tool_names_name_the_setting(tools_file, tmp_path, spec, message):
    with pytest.raises(ConfigError) as e:
        load_tool(spec.format(file=tools_file), "ppo.tools[2]", base_dir=tmp_path)
    assert str(e.value).startswith("ppo.tools[2]: ") and message in str(e.value)


def test_two_tools_with_one_name_are_refused(tools_file):
    with pytest.raises(ConfigError, match=r"ppo.tools\[1\]: .* is named 'add'"):
        load_tools([f"{tools_file}:add", f"{tools_file}:add"], "ppo.tools")


def test_argument_checks(tools):
    add, tag = tools["add"], tools["tag"]
    assert check_arguments(add, {"a": 2}) is None
    assert check_arguments(add, {"a": 2, "b": 0.5}) is None
    assert "missing required argument 'a'" in check_arguments(add, {"b": 1})
    assert "takes no argument 'c'" in check_arguments(add, {"a": 1, "c": 1})
    assert "expected integer, got string '2'" in check_arguments(add, {"a": "2"})
    assert "expected integer, got boolean" in check_arguments(add, {"a": True})
    assert "expected integer, got number 2.5" in check_arguments(add, {"a": 2.5})
    assert check_arguments(tag, {"words": ["a"], "mode": None, "scale": [2, "y"]}) is None
    assert "item 1: expected string" in check_arguments(tag, {"words": ["a", 3]})
    assert "not one of ['upper', 'lower']" in check_arguments(tag, {"words": [], "mode": "title"})
    assert "expected 2 items" in check_arguments(tag, {"words": [], "scale": [1]})


# --- the call format ---

def test_parse_hermes_calls_with_text_around_them():
    text = ('I will add. <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call> and '
            '<tool_call>{"name": "calculator", "arguments": {"expression": "2*3"}}</tool_call> done')
    assert parse_tool_calls(text) == [ToolCall("add", {"a": 1, "b": 2}),
                                      ToolCall("calculator", {"expression": "2*3"})]
    assert parse_tool_calls("no call here") == []
    assert parse_tool_calls('<tool_call>{"name": "now"}</tool_call>') == [ToolCall("now", {})]


@pytest.mark.parametrize("body, problem", [
    ("{bad json", "not valid JSON"),
    ('["add", {}]', "expected a JSON object"),
    ('{"arguments": {}}', 'no "name" string'),
    ('{"name": "add", "arguments": "{\\"a\\": 1}"}', '"arguments" must be a JSON object, got a string'),
    ('{"name": "add", "arguments": {}, "id": 3}', "unexpected key 'id'"),
])
def test_calls_that_do_not_parse_say_why(body, problem):
    (call,) = parse_tool_calls(f"<tool_call>{body}</tool_call>")
    assert isinstance(call, BadCall) and problem in call.problem


def test_an_unclosed_call_is_a_bad_call():
    (call,) = parse_tool_calls('<tool_call>{"name": "add", "arguments": {"a": 1}}')
    assert isinstance(call, BadCall) and "not closed" in call.problem


def test_instructions_for_a_template_without_tools(tiny_tokenizer, tools):
    schemas = [tools["add"].schema]
    assert not template_takes_tools(tiny_tokenizer)  # its template ignores tools=
    messages = with_tool_instructions([{"role": "user", "content": "2+2?"}], schemas)
    assert messages[0]["role"] == "system" and messages[1] == {"role": "user", "content": "2+2?"}
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert json.dumps(schemas[0]) in text and "<tool_call>" in text
    # an existing system message keeps its text, after the instructions
    merged = with_tool_instructions([{"role": "system", "content": "Be brief."}], schemas)
    assert len(merged) == 1 and merged[0]["content"] == tool_instructions(schemas) + "\n\nBe brief."


def test_template_with_tools_is_detected(tiny_tokenizer, tools):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
                         + tiny_tokenizer.chat_template)
    assert template_takes_tools(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[tools["add"].schema], tokenize=False)
    assert '"name": "add"' in text


def test_tool_message():
    assert tool_message("add", "3") == {"role": "tool", "name": "add", "content": "3"}


# --- running calls ---

def test_every_failure_is_an_observation(tools):
    text = "".join(f"<tool_call>{b}</tool_call>" for b in [
        '{"name": "add", "arguments": {"a": 2, "b": 0.5}}',
        '{"name": "add", "arguments": {"a": 1}',
        '{"name": "divide", "arguments": {}}',
        '{"name": "add", "arguments": {"a": "2"}}',
        '{"name": "fail", "arguments": {"x": 4}}',
        '{"name": "hang", "arguments": {"seconds": 30}}',
        '{"name": "tag", "arguments": {"words": ["a", "b"]}}',
    ])
    obs = run_calls(parse_tool_calls(text), tools, timeout=0.5)
    assert [o.error for o in obs] == [None, "parse_error", "unknown_tool", "bad_arguments", "tool_error", "timeout",
                                      None]
    assert {o.error for o in obs} - {None} == set(ERROR_KINDS)
    assert obs[0].message == {"role": "tool", "name": "add", "content": "2.5"}
    assert "not valid JSON" in obs[1].content
    assert "no tool named 'divide'" in obs[2].content and "add, tag, fail, hang, calculator" in obs[2].content
    assert "expected integer" in obs[3].content
    assert obs[4].content == "Error: fail raised RuntimeError: broken on 4"
    assert obs[5].content == "Error: hang did not finish within 0.5 s."
    assert json.loads(obs[6].content) == {"tags": ["A", "B"]}  # a non-string result goes back as JSON


def test_a_hanging_tool_is_cut_at_the_deadline_and_calls_run_concurrently(tools):
    calls = [ToolCall("hang", {"seconds": 0.3}) for _ in range(5)] + [ToolCall("hang", {"seconds": 30})]
    start = time.monotonic()
    obs = run_calls(calls, tools, timeout=1.0)
    took = time.monotonic() - start
    assert [o.content for o in obs[:5]] == ["woke"] * 5  # 5 × 0.3 s within 1 s: they ran side by side
    assert obs[5].error == "timeout"
    assert 0.9 < took < 3  # the batch waited for the hanging call only up to its limit, not 30 s
    assert still_running() >= 1  # its thread is abandoned, not stopped


def test_timeout_must_be_positive(tools):
    with pytest.raises(ValueError, match="positive"):
        run_calls([], tools, timeout=0)


# --- the calculator ---

@pytest.mark.parametrize("expression, value", [
    ("(12 + 30) * 4 / 7", "24"), ("7 / 2", "3.5"), ("2 ^ 10", "1024"), ("2 ** -1", "0.5"), ("-3 % 5", "2"),
    ("17 // 5", "3"), ("0.1 + 0.2", "0.3"), ("sqrt(16) + abs(-2)", "6"), ("round(2.567, 2)", "2.57"),
    ("max(1, 5, 3) - min(4, 2)", "3"), ("3 × 4 − 2 ÷ 4", "11.5"), ("2 * pi", "6.28318530718"),
])
def test_calculator(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "more than 1000 digits"), ("x + 1", "unknown name 'x'"),
    ('__import__("os")', "unknown name '__import__'"),
    ('__import__("os").system("true")', "is not arithmetic"), ("'a' * 3", "is not arithmetic"),
    ("(1).__class__", "is not arithmetic"), ("2 +", "cannot read"), ("sqrt(-1)", "math domain error"),
    ("(-8) ** (1/3)", "not a real number"), ("1e308 * 10", "too large"), ("1 < 2", "is not arithmetic"),
])
def test_calculator_refuses_with_a_reason(expression, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        calculator(expression)
