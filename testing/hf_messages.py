"""Conversations as transformers' `apply_chat_template` takes them, from the preprocessor's `Example`s.

A user turn is a "user" message, an observation a "tool" message, an assistant's function-call turn an
"assistant" message with OpenAI-style `tool_calls` (its thought, if any, as the content); the row's
tools JSON becomes the `tools` list. The release's chat template must render such a conversation to
the text the preprocessor trained on (tests/test_release_template.py).

    messages, tools = hf_conversation(example)
    tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
"""

from __future__ import annotations

import json
from typing import Any

from formats.chat_template import FUNCTION, OBSERVATION
from formats.tool_calls import split_thought
from preprocess.converters import Example


def hf_conversation(example: Example) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) for `apply_chat_template`; tools None where the row gives none."""
    messages = [{"role": "system", "content": example.system}] if example.system else []
    for role, text in example.messages:
        if role == FUNCTION:
            messages.append(_function_call_message(text))
        elif role == OBSERVATION:
            messages.append({"role": "tool", "content": text})
        else:
            messages.append({"role": role, "content": text})
    return messages, json.loads(example.tools) if example.tools else None


def _function_call_message(text: str) -> dict[str, Any]:
    thought, calls_json = split_thought(text)
    calls = json.loads(calls_json)
    return {
        "role": "assistant",
        "content": thought,
        "tool_calls": [
            {"type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
            for call in (calls if isinstance(calls, list) else [calls])
        ],
    }
