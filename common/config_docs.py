"""A typed config tree documents itself: each dataclass field's doc is the comment beside it or the
comment block right above it, so the source stays the one place a key is explained, and `--help` and
the tests read it from there.

    field_docs(ModelConfig)            # {"recompute": "...", ...}
    print(describe_tree(TrainConfig()))  # every dotted key with its type, default and doc, by section
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
import types
import typing


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its comment} for a dataclass whose source is available: the comment lines right
    above the field, then the comment at the end of its line."""
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in names:
            docs[match.group(1)] = " ".join([*above, _inline_comment(line)]).strip()
        above = []
    return docs


_FIELD = re.compile(r"^\s+(\w+)\s*:")


def _inline_comment(line: str) -> str:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):  # a field continued on the next line
        return ""
    return next((t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT), "")


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "|".join(str(value) for value in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if arg is type(None) else _type_name(arg) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"list[{_type_name(item)}]"
    return getattr(hint, "__name__", str(hint))


def _default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def describe_tree(config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, doc) for every leaf of a dataclass instance, depth first."""
    rows = []
    hints = typing.get_type_hints(type(config))
    docs = field_docs(type(config))
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(value):
            rows += describe_tree(value, f"{key}.")
        else:
            rows.append((key, _type_name(hints[field.name]), _default_text(value), docs.get(field.name, "")))
    return rows


def format_tree(config, width: int = 110) -> str:
    """The rows of `describe_tree`, grouped by section, for a `--help` epilog."""
    lines, section = [], None
    for key, type_name, default, doc in describe_tree(config):
        head = key.split(".")[0] if "." in key else "(top level)"
        if head != section:
            lines.append(f"\n{head}:")
            section = head
        lines.append(f"  {key} ({type_name}, default {default})")
        if doc:
            # Not at hyphens: "data-parallel" cut in two reads as two words.
            lines += textwrap.wrap(
                doc, width, initial_indent="      ", subsequent_indent="      ", break_on_hyphens=False
            )
    return "\n".join(lines).lstrip("\n")
