"""Tool use as chat templates write it: the tool list in the system turn, function calls in assistant turns.

Two formats, named as LLaMA-Factory 0.9.3 names them and producing exactly its text:

* `qwen` (Qwen2.5's, used by the qwen, qwen3 and AM-thinking templates): the tools as JSON lines inside
  `<tools></tools>` after the system text; each call as `<tool_call>\\n{"name": .., "arguments": ..}\\n
  </tool_call>`, several joined by newlines;
* `llama3` (Llama 3.1's JSON tool calling, tools in the system turn): a prompt with the knowledge cutoff
  and a date, each tool as indented JSON; a call as `{"name": .., "parameters": ..}`, several as a list.

Data gives tools as a JSON string (a `tools` column) and calls as the JSON content of a
`function_call` turn (an object or a list of objects with `name` and `arguments`). What cannot be read
raises `NotExpressible`, and the preprocessor drops that row under the exception's reason.
"""

from __future__ import annotations

import json
import re
from typing import Any

INVALID_TOOLS = "invalid_tools"
INVALID_FUNCTION_CALL = "invalid_function_call"
TOOL_FORMATS = ("qwen", "llama3")

# Each prompt's fixed text around what a row gives: the Python writer and the Jinja one share it.
_QWEN_TOOLS_BEFORE = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_QWEN_TOOLS_AFTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)
_LLAMA3_BEFORE_DATE = "Cutting Knowledge Date: December 2023\nToday Date: "
_LLAMA3_AFTER_DATE = (
    "\n\nYou have access to the following functions. To call a function, please respond with JSON for a "
    'function call. Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}. Do not use variables.\n\n"
)
_THOUGHT = re.compile(r"<think>(.*)</think>", re.DOTALL)


class NotExpressible(ValueError):
    """A row's tools or function call that the template cannot write; `reason` names the drop."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def tool_prompt(tool_format: str, tools_json: str, date: str) -> str:
    """The text appended to the system turn for a row's `tools` (a JSON list; an empty list gives "")."""
    try:
        tools = json.loads(tools_json)
    except (json.JSONDecodeError, TypeError) as exc:
        raise NotExpressible(INVALID_TOOLS, f"tools are not JSON: {exc}") from exc
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise NotExpressible(INVALID_TOOLS, "tools must be a JSON list of objects")
    if not tools:
        return ""
    wrapped = [
        tool if tool.get("type") == "function" else {"type": "function", "function": tool} for tool in tools
    ]
    if tool_format == "qwen":
        return _QWEN_TOOLS_BEFORE + "".join("\n" + _dumps(tool) for tool in wrapped) + _QWEN_TOOLS_AFTER
    tool_text = "".join(json.dumps(tool, indent=4, ensure_ascii=False) + "\n\n" for tool in wrapped)
    return _LLAMA3_BEFORE_DATE + date + _LLAMA3_AFTER_DATE + tool_text


def split_thought(content: str) -> tuple[str, str]:
    """(the <think> block of a function-call turn, or "", the rest: the calls' JSON)."""
    thought = _THOUGHT.search(content)
    return (thought.group(0), content.replace(thought.group(0), "")) if thought else ("", content)


def function_call_text(tool_format: str, content: str) -> str:
    """An assistant's function-call turn as the template writes it; a leading <think> block is kept."""
    thought, content = split_thought(content)
    calls = _parse_calls(content)
    if tool_format == "qwen":
        text = "\n".join(
            f"<tool_call>\n{_dumps({'name': name, 'arguments': arguments})}\n</tool_call>"
            for name, arguments in calls
        )
    else:
        objects = [{"name": name, "parameters": arguments} for name, arguments in calls]
        text = _dumps(objects[0] if len(objects) == 1 else objects)
    return thought + text


def _parse_calls(content: str) -> list[tuple[str, Any]]:
    try:
        calls = json.loads(content)
    except json.JSONDecodeError as exc:
        raise NotExpressible(INVALID_FUNCTION_CALL, f"a function call is not JSON: {exc}") from exc
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(call, dict) and "name" in call and "arguments" in call for call in calls):
        raise NotExpressible(INVALID_FUNCTION_CALL, "a function call needs `name` and `arguments`")
    return [(call["name"], call["arguments"]) for call in calls]


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# The same text in a transformers chat template: `tools` as apply_chat_template takes them (JSON schemas,
# bare or wrapped in {"type": "function", "function": ...}), an assistant message's `tool_calls` in the
# OpenAI shape ({"function": {"name", "arguments"}}, or {"name", "arguments"}). transformers' `tojson`
# is json.dumps with ensure_ascii=False, the writer's `_dumps`.
_JINJA_WRAPPED = (
    "{%- set wrapped = tool if tool['type'] == 'function' else {'type': 'function', 'function': tool} -%}"
)
_JINJA_CALL = "{%- set call = call['function'] if call['function'] is defined else call -%}"


def jinja_tool_prompt(tool_format: str) -> str:
    """Jinja statements that set `ns.tool_text` to `tool_prompt`'s text for `tools` (llama3: dated
    `date_string`, else today as `strftime_now` gives it, as LLaMA-Factory dates its training data)."""
    q = json.dumps
    if tool_format == "qwen":
        return (
            "{%- set ns.tool_text = '' -%}{%- for tool in tools -%}"
            + _JINJA_WRAPPED
            + "{%- set ns.tool_text = ns.tool_text + '\\n' + (wrapped | tojson) -%}{%- endfor -%}"
            + f"{{%- set ns.tool_text = {q(_QWEN_TOOLS_BEFORE)} + ns.tool_text + {q(_QWEN_TOOLS_AFTER)} -%}}"
        )
    return (
        "{%- if date_string is not defined -%}{%- set date_string = strftime_now('%d %b %Y') -%}{%- endif -%}"
        f"{{%- set ns.tool_text = {q(_LLAMA3_BEFORE_DATE)} + date_string + {q(_LLAMA3_AFTER_DATE)} -%}}"
        "{%- for tool in tools -%}"
        + _JINJA_WRAPPED
        + "{%- set ns.tool_text = ns.tool_text + (wrapped | tojson(indent=4)) + '\\n\\n' -%}{%- endfor -%}"
    )


def jinja_function_call(tool_format: str) -> str:
    """Jinja statements that set `ns.calls` to `function_call_text`'s text for `message['tool_calls']`."""
    if tool_format == "qwen":
        return (
            "{%- set ns.calls = '' -%}{%- for call in message['tool_calls'] -%}"
            + _JINJA_CALL
            + "{%- if not loop.first -%}{%- set ns.calls = ns.calls + '\\n' -%}{%- endif -%}"
            "{%- set ns.calls = ns.calls + '<tool_call>\\n' + ({'name': call['name'], 'arguments': "
            "call['arguments']} | tojson) + '\\n</tool_call>' -%}{%- endfor -%}"
        )
    return (
        "{%- set ns.objects = [] -%}{%- for call in message['tool_calls'] -%}"
        + _JINJA_CALL
        + "{%- set ns.objects = ns.objects + [{'name': call['name'], 'parameters': call['arguments']}] -%}"
        "{%- endfor -%}"
        "{%- set ns.calls = (ns.objects[0] if ns.objects | length == 1 else ns.objects) | tojson -%}"
    )
