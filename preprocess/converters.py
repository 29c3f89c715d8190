"""Rows -> `Example`s (system, tools, role-tagged messages), or the reason a row is dropped.

Three readers, each a small picklable object that travels to the tokenising workers:

* `AlignedConverter`: the aligned AM-Thinking parquet (tools/get_am_dataset.py), judged by the rule
  of `preprocess.conversation` (the recipe's path, unchanged);
* `AlpacaConverter` and `SharegptConverter`: a registry entry's rows, read as LLaMA-Factory 0.9.3's
  converters read them (`AlpacaDatasetConverter`, `SharegptDatasetConverter`), followed by its
  supervised processor's check (an odd number of prompt messages and one response). Where
  LLaMA-Factory would stop with an exception (a non-string text, a history item that is not a pair),
  the row is dropped and counted instead.

When a dataset loses every row (or most), `drop_details` says what a dropped row holds (the role tags of
its messages, the type of its tools) and `drop_hints` turns those into the fix: the entry's `tags`, or
tools stored as a JSON string.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

from formats.chat_template import ASSISTANT, FUNCTION, OBSERVATION, USER
from formats.tool_calls import INVALID_FUNCTION_CALL, INVALID_TOOLS

from . import conversation
from .registry import DatasetEntry, Tags

SYSTEM = "system"


@dataclass(frozen=True)
class Example:
    """One conversation as a template renders it."""

    system: str | None
    tools: str | None  # a JSON list of tools, as the row gives it
    messages: list[tuple[str, str]]  # (role, text); roles alternate user/observation, assistant/function
    key: str  # its content identity, which decides the held-out split
    subset: str = ""


Converted = Example | str  # an Example, or the reason the row is dropped


@dataclass(frozen=True)
class AlignedConverter:
    system_source: str  # "turn" or "column" (preprocess_sft.py --system-source)

    def __call__(self, row: dict[str, Any]) -> Converted:
        problem = conversation.conversation_problem(row.get("conversations"))
        if problem:
            return problem
        turn_system, turns = conversation.split_system(row["conversations"])
        return Example(
            system=row.get("system") if self.system_source == "column" else turn_system,
            tools=None,
            messages=[(USER if t["from"] == conversation.HUMAN else ASSISTANT, t["value"]) for t in turns],
            key=conversation.aligned_key(row["conversations"]),
            subset=row.get("subset") or "",
        )

    def drop_details(self, row: dict[str, Any], reason: str) -> list[str]:
        return []  # the aligner's own rule, counted by reason (tools/get_am_dataset.py explains each)

    def drop_hints(self, details: Counter) -> list[str]:
        return []


@dataclass(frozen=True)
class AlpacaConverter:
    entry: DatasetEntry

    def __call__(self, row: dict[str, Any]) -> Converted:
        columns = self.entry.columns
        messages: list[tuple[str, Any]] = []
        history = row.get(columns.history) if columns.history else None
        if isinstance(history, list):
            for item in history:
                if not isinstance(item, list | tuple) or len(item) != 2:
                    return conversation.MALFORMED_HISTORY
                messages += [(USER, item[0]), (ASSISTANT, item[1])]
        query = [row.get(c) for c in (columns.prompt, columns.query) if c and row.get(c)]
        if not all(isinstance(part, str) for part in query):
            return conversation.NON_STRING_VALUE
        messages.append((USER, "\n".join(query)))
        response = row.get(columns.response) if columns.response else None
        if not isinstance(response, str):
            return conversation.NO_RESPONSE
        messages.append((ASSISTANT, response))
        system = row.get(columns.system) if columns.system else ""
        return _example(system, row, columns.tools, messages)

    def drop_details(self, row: dict[str, Any], reason: str) -> list[str]:
        return _tools_details(row, self.entry, reason)

    def drop_hints(self, details: Counter) -> list[str]:
        return drop_hints(self.entry, details)


@dataclass(frozen=True)
class SharegptConverter:
    entry: DatasetEntry

    def __call__(self, row: dict[str, Any]) -> Converted:
        columns, tags = self.entry.columns, self.entry.tags
        raw = row.get(columns.messages)
        if raw is None:
            return conversation.MISSING_CONVERSATIONS
        if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
            return conversation.MALFORMED_TURN
        if tags.system_tag and raw and raw[0].get(tags.role_tag) == tags.system_tag:
            system, raw = raw[0].get(tags.content_tag), raw[1:]
        else:
            system = row.get(columns.system) if columns.system else ""
        roles = {
            tags.user_tag: USER,
            tags.observation_tag: OBSERVATION,
            tags.assistant_tag: ASSISTANT,
            tags.function_tag: FUNCTION,
        }
        allowed = (
            {tags.user_tag, tags.observation_tag} - {None},
            {tags.assistant_tag, tags.function_tag} - {None},
        )
        messages = []
        for i, message in enumerate(raw):
            tag = message.get(tags.role_tag)
            if tag not in allowed[i % 2]:
                return conversation.INVALID_ROLE_TAG
            messages.append((roles[tag], message.get(tags.content_tag)))
        if len(messages) % 2:
            return conversation.INVALID_MESSAGE_COUNT
        if not messages:
            return conversation.EMPTY_CONVERSATIONS
        return _example(system, row, columns.tools, messages)

    def drop_details(self, row: dict[str, Any], reason: str) -> list[str]:
        if reason != conversation.INVALID_ROLE_TAG:
            return _tools_details(row, self.entry, reason)
        role_tag = self.entry.tags.role_tag
        details = []
        for message in row.get(self.entry.columns.messages) or []:
            if role_tag in message:
                detail = repr(message[role_tag])
            else:
                detail = f"no {role_tag!r} key (its keys: {', '.join(map(repr, sorted(message)))})"
            if detail not in details:
                details.append(detail)
        return details

    def drop_hints(self, details: Counter) -> list[str]:
        return drop_hints(self.entry, details)


def _example(system: Any, row: dict[str, Any], tools_column: str | None, messages: list) -> Converted:
    """The Example, once every text is a string that can be tokenised."""
    tools = row.get(tools_column) if tools_column else ""
    if tools is not None and not isinstance(tools, str):
        return INVALID_TOOLS  # LLaMA-Factory reads tools only as a JSON string
    if system is not None and not isinstance(system, str):
        return conversation.NON_STRING_VALUE
    texts = [system or "", tools or "", *(text for _, text in messages)]
    if not all(isinstance(text, str) for text in texts):
        return conversation.NON_STRING_VALUE
    if not all(conversation.is_encodable(text) for text in texts):
        return conversation.UNDECODABLE_BYTES
    key = json.dumps([system or "", tools or "", messages], ensure_ascii=False)
    return Example(system=system, tools=tools, messages=messages, key=key)


def _tools_details(row: dict[str, Any], entry: DatasetEntry, reason: str) -> list[str]:
    tools = row.get(entry.columns.tools) if entry.columns.tools else None
    if reason == INVALID_TOOLS and tools is not None and not isinstance(tools, str):
        return [f"a {type(tools).__name__}, not a string"]
    return []


# The tags of OpenAI-style messages ({"role": "user", "content": ...}), which sharegpt's defaults are not.
OPENAI_TAGS = {
    "role_tag": "role",
    "content_tag": "content",
    "user_tag": "user",
    "assistant_tag": "assistant",
    "system_tag": "system",
}


def _role_tag_hint(tags: Tags, seen: set[str], described: str) -> str:
    """Why messages' roles were refused: names the entry does not expect, or its own names out of order."""
    order = "a user or observation turn first, then assistant or function turns alternating"
    role_values = {
        repr(getattr(tags, f.name)) for f in fields(Tags) if f.name not in ("role_tag", "content_tag")
    }
    if seen <= role_values:
        return (
            f"its messages' role tags ({described}) are the entry's, out of the order LLaMA-Factory "
            f"requires: {order}"
        )
    expected = ", ".join(
        f"{f.name} {getattr(tags, f.name)!r}" for f in fields(Tags) if getattr(tags, f.name) is not None
    )
    return (
        f"its messages' role tags are {described}; the entry expects {expected} ({order}; LLaMA-Factory's "
        'defaults where the entry gives no "tags"): set the entry\'s "tags" to the rows\' names; an '
        f'OpenAI-messages file needs "tags": {json.dumps(OPENAI_TAGS)}'
    )


def drop_hints(entry: DatasetEntry, details: Counter) -> list[str]:
    """What to change in a registry entry or its data, from the details (`(reason, detail) -> rows`) of
    the dataset's dropped rows."""
    found: dict[str, list[str]] = {}
    for (reason, detail), rows in details.most_common():
        found.setdefault(reason, []).append(f"{detail} ({rows:,} row{'s' * (rows != 1)})")
    found = {reason: ", ".join(parts) for reason, parts in found.items()}
    hints = []
    if conversation.INVALID_ROLE_TAG in found:
        seen = {detail for reason, detail in details if reason == conversation.INVALID_ROLE_TAG}
        hints.append(_role_tag_hint(entry.tags, seen, found[conversation.INVALID_ROLE_TAG]))
    if INVALID_TOOLS in found:
        hints.append(
            f"its tools (column {entry.columns.tools!r}): {found[INVALID_TOOLS]}; LLaMA-Factory reads tools "
            "only as a JSON string of a list of tool objects: store each row's tools as json.dumps(tools)"
        )
    if INVALID_FUNCTION_CALL in found:
        hints.append(
            f"its function-call turns: {found[INVALID_FUNCTION_CALL]}; each is the JSON of a call (or a "
            'list of calls) with "name" and "arguments"'
        )
    return hints


def converter_for(entry: DatasetEntry) -> AlpacaConverter | SharegptConverter:
    return AlpacaConverter(entry) if entry.formatting == "alpaca" else SharegptConverter(entry)
