"""What counts as a valid aligned conversation, and the names of every reason a row is dropped.

The rule is the one LLaMA-Factory's ShareGPT converter applies with the K2-Think dataset entry
(role tag `from`, content tag `value`, user tag `human`, assistant tag `assistant`): an optional
leading `system` turn, then `human` and `assistant` turns alternating, starting with `human` and
ending with `assistant`. Both the aligner (tools/get_am_dataset.py) and the preprocessor use it, so a
row is judged the same way at every stage.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from formats.tool_calls import INVALID_FUNCTION_CALL, INVALID_TOOLS

SYSTEM, HUMAN, ASSISTANT = "system", "human", "assistant"
KNOWN_ROLES = frozenset({SYSTEM, HUMAN, ASSISTANT})

# Drop reasons, in the order summaries print them.
MISSING_CONVERSATIONS = "missing_conversations"
EMPTY_CONVERSATIONS = "empty_conversations"
MALFORMED_TURN = "malformed_turn"
UNKNOWN_ROLE = "unknown_role"
ROLES_OUT_OF_ORDER = "roles_out_of_order"
NON_STRING_VALUE = "non_string_value"
UNDECODABLE_BYTES = "undecodable_bytes"
BROKEN_JSONL_LINE = "broken_jsonl_line"
NOT_AN_OBJECT = "row_not_an_object"
# Registry datasets, as LLaMA-Factory's converters and its supervised processor judge a row (where it
# would stop with an exception instead, the row is dropped and counted here).
INVALID_ROLE_TAG = (
    "invalid_role_tag"  # a role not allowed at its place: user/observation, then assistant/function
)
INVALID_MESSAGE_COUNT = "invalid_message_count"  # an odd number of messages
NO_RESPONSE = "no_response"  # alpaca: the response is not a string
MALFORMED_HISTORY = "malformed_history"  # alpaca: a history item that is not a [prompt, response] pair
OVERLONG = "overlong"  # only with `preprocess_sft.py --overlong drop`: longer than the cutoff
DROP_REASONS = (
    MISSING_CONVERSATIONS,
    EMPTY_CONVERSATIONS,
    MALFORMED_TURN,
    UNKNOWN_ROLE,
    ROLES_OUT_OF_ORDER,
    NON_STRING_VALUE,
    UNDECODABLE_BYTES,
    BROKEN_JSONL_LINE,
    NOT_AN_OBJECT,
    INVALID_ROLE_TAG,
    INVALID_MESSAGE_COUNT,
    NO_RESPONSE,
    MALFORMED_HISTORY,
    INVALID_TOOLS,
    INVALID_FUNCTION_CALL,
    OVERLONG,
)


def conversation_problem(conversations: Any) -> str | None:
    """Returns the drop reason for `conversations` (a list of {from, value} turns), or None if valid."""
    if conversations is None:
        return MISSING_CONVERSATIONS
    if not isinstance(conversations, list):
        return MALFORMED_TURN
    if not conversations:
        return EMPTY_CONVERSATIONS
    for turn in conversations:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return MALFORMED_TURN
        if turn["from"] not in KNOWN_ROLES:
            return UNKNOWN_ROLE
        if not isinstance(turn["value"], str):
            return NON_STRING_VALUE
        if not is_encodable(turn["value"]):
            return UNDECODABLE_BYTES
    roles = [turn["from"] for turn in conversations]
    if roles[0] == SYSTEM:
        roles = roles[1:]
    expected = [HUMAN if i % 2 == 0 else ASSISTANT for i in range(len(roles))]
    if not roles or roles != expected or roles[-1] != ASSISTANT:
        return ROLES_OUT_OF_ORDER
    return None


def is_encodable(text: str) -> bool:
    """False for strings that cannot be written as UTF-8 (lone surrogates from `\\ud800`-style JSON
    escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_system(conversations: list[dict[str, str]]) -> tuple[str | None, list[dict[str, str]]]:
    """(text of a leading system turn or None, the human/assistant turns) of a valid conversation."""
    if conversations[0]["from"] == SYSTEM:
        return conversations[0]["value"], conversations[1:]
    return None, conversations


def aligned_key(conversations: list[dict[str, str]]) -> str:
    """The content identity of an aligned conversation: its turns' roles and texts."""
    return json.dumps([[t["from"], t["value"]] for t in conversations], ensure_ascii=False)


def held_out(key: str, fraction: float, seed: int) -> bool:
    """Whether a conversation of content identity `key` belongs to the validation split: decided by a
    seeded hash of its content alone, so a conversation keeps its side when the dataset grows, shrinks
    or is reordered, and duplicates always land on the same side."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, key=f"valid-{seed}".encode()).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64
