#!/usr/bin/env python
"""Writes the inputs of the LLaMA-Factory parity tests into tests/data/llamafactory: a registry
(dataset_info.json) and one dataset in each format it describes (alpaca json with history and system;
sharegpt jsonl with tools, function calls and observations; OpenAI-style messages in parquet, described
by tags; reasoning traces), each with rows LLaMA-Factory keeps (multi-turn, long rows that truncate)
and rows it drops; and the reasoning traces again, drawn with `num_samples` below and above their count.

    .venv/bin/python -m testing.llamafactory_inputs    # then regenerate the golden files:
    .venv/bin/python -m testing.llamafactory_golden --lf-python /tmp/lf/bin/python
"""

# ruff: noqa: E501  (the rows read best one per line)
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DATA_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "llamafactory"

LONG_ANSWER = (
    "<think>\n"
    + " ".join(f"step {i}: carry the {i % 10}." for i in range(120))
    + "\n</think>\n\nThe answer is 42."
)
LONG_QUESTION = "Summarise this: " + " ".join(f"sentence number {i} about rivers and 山." for i in range(90))

ALPACA = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat well.\n2. Sleep.\n3. Move.",
     "system": "You are a coach.", "history": []},
    {"instruction": "Translate to French", "input": "Good morning, 世界!", "output": "Bonjour, le monde !", "system": None,
     "history": [["Hi", "Hello! How can I help?"], ["Can you translate?", "Yes, send the text."]]},
    {"instruction": "", "input": "Only an input, no instruction.", "output": "Understood.", "system": "", "history": None},
    {"instruction": "Unanswered question", "input": "", "output": None, "system": None, "history": []},  # dropped
    {"instruction": LONG_QUESTION, "input": "", "output": LONG_ANSWER, "system": "Be thorough.",
     "history": [["Warm-up?", "Ready."]]},
    {"instruction": "Empty answer", "input": "", "output": "", "system": None, "history": []},
]  # fmt: skip

TOOLS = json.dumps(
    [
        {"name": "get_weather", "description": "Current weather of a city", "parameters": {"type": "object",
         "properties": {"city": {"type": "string", "description": "City name"}, "unit": {"type": "string",
         "enum": ["C", "F"]}}, "required": ["city"]}},
        {"type": "function", "function": {"name": "add", "description": "Adds numbers", "parameters": {
         "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}},
    ],
    ensure_ascii=False,
)  # fmt: skip
CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Zürich", "unit": "C"}}, ensure_ascii=False)
TWO_CALLS = json.dumps(
    [
        {"name": "add", "arguments": {"a": 1, "b": 2.5}},
        {"name": "get_weather", "arguments": {"city": "Paris"}},
    ]
)


def turns(*pairs):
    return [{"from": role, "value": value} for role, value in pairs]


SHAREGPT = [
    {"conversations": turns(("human", "Weather in Zürich?"), ("function_call", CALL),
                            ("observation", '{"temp": 3, "sky": "fog"}'), ("gpt", "It is 3 °C and foggy in Zürich.")),
     "tools": TOOLS},
    {"conversations": turns(("system", "You route requests to tools."), ("human", "1 + 2.5, and Paris weather"),
                            ("function_call", "<think>two calls at once</think>" + TWO_CALLS), ("observation", "3.5"),
                            ("gpt", "3.5; Paris next.")),
     "tools": TOOLS},
    {"conversations": turns(("human", "No tools here."), ("gpt", "Fine."), ("human", "Second turn"), ("gpt", "Second answer")),
     "tools": ""},
    {"conversations": turns(("human", "An empty tool list"), ("gpt", "still a system slot")), "tools": "[]"},
    {"conversations": turns(("gpt", "answer first: invalid role order"), ("human", "?")), "tools": ""},  # dropped
    {"conversations": turns(("human", "odd count"), ("gpt", "a"), ("human", "dangling")), "tools": ""},  # dropped
    {"conversations": [], "tools": ""},  # dropped
    {"conversations": turns(("system", "sys only")), "tools": ""},  # dropped
]  # fmt: skip


def messages(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


OPENAI = [
    {"messages": messages(("system", "You are terse."), ("user", "Capital of Peru?"), ("assistant", "Lima."))},
    {"messages": messages(("user", "Hi"), ("assistant", "Hello."), ("user", "Count to 3"), ("assistant", "1, 2, 3."))},
    {"messages": messages(("user", "tool role is not a tag here"), ("tool", "x"))},  # dropped
    {"messages": messages(("user", LONG_QUESTION), ("assistant", LONG_ANSWER))},
]  # fmt: skip

REASONING = [
    {"conversations": turns(("human", "What is 17 + 25?"), ("gpt", "<think>\n17 + 25 = 42.\n</think>\n\n42"))},
    {"conversations": turns(("human", "First?"), ("gpt", "<think>history thought</think>\n\nOne."), ("human", "Then?"),
                            ("gpt", "Two, without a thought block."))},
    {"conversations": turns(("human", "No thinking at all"), ("gpt", "Plain answer."))},
    {"conversations": turns(("human", "Only a closing tag"), ("gpt", "odd</think> answer"))},
    {"conversations": turns(("human", "Long"), ("gpt", LONG_ANSWER), ("human", "and again"), ("gpt", "<think>short</think>\n\nok"))},
]  # fmt: skip

REGISTRY = {
    "alpaca_history": {
        "file_name": "alpaca_history.json",
        "columns": {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"},
    },
    "sharegpt_tools": {
        "file_name": "sharegpt_tools.jsonl",
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "tools": "tools"},
    },
    "openai_messages": {
        "file_name": "openai_messages.parquet",
        "formatting": "sharegpt",
        "columns": {"messages": "messages"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                 "system_tag": "system"},
    },
    "reasoning": {"file_name": "reasoning.jsonl", "formatting": "sharegpt"},
    # LLaMA-Factory's draw from numpy's generator seeded with the training seed: a subset, then every row
    # once and random repeats
    "reasoning_subset": {"file_name": "reasoning.jsonl", "formatting": "sharegpt", "num_samples": 2},
    "reasoning_repeated": {"file_name": "reasoning.jsonl", "formatting": "sharegpt", "num_samples": 9},
}  # fmt: skip


def main() -> None:
    (DATA_DIR / "alpaca_history.json").write_text(json.dumps(ALPACA, ensure_ascii=False, indent=1) + "\n")
    for name, rows in (("sharegpt_tools", SHAREGPT), ("reasoning", REASONING)):
        (DATA_DIR / f"{name}.jsonl").write_text(
            "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        )
    pq.write_table(pa.Table.from_pylist(OPENAI), DATA_DIR / "openai_messages.parquet")
    (DATA_DIR / "dataset_info.json").write_text(json.dumps(REGISTRY, indent=2) + "\n")


if __name__ == "__main__":
    main()
