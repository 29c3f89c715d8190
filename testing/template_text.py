"""A conversation as the text a chat template makes of it, for tests and benchmarks (the encoder
tokenises the template's pieces one by one and never needs the whole text).

    text = render(AM_THINKING, system=None, turns=[question, answer])
"""

from __future__ import annotations

from collections.abc import Sequence


def render(template, system: str | None, turns: Sequence[str]) -> str:
    """The whole conversation as text: `template.pieces(system, turns)` joined."""
    return "".join(template.pieces(system, turns))
