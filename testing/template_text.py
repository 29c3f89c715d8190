"""A conversation as the text a chat template makes of it, for tests and benchmarks (the encoder
tokenises the template's strings one by one and never needs the whole text).

    text = render(AM_THINKING, system=None, turns=[question, answer])
"""

from __future__ import annotations

from collections.abc import Sequence

from formats.chat_template import ASSISTANT, USER


def as_messages(turns: Sequence[str]) -> list[tuple[str, str]]:
    """Alternating user and assistant turns as (role, text) messages."""
    return [(USER if i % 2 == 0 else ASSISTANT, text) for i, text in enumerate(turns)]


def render(template, system: str | None, turns: Sequence[str], **options) -> str:
    """The whole conversation as text: `template.render(...)`'s strings joined."""
    return "".join(
        piece for message in template.render(system, None, as_messages(turns), **options) for piece in message
    )
