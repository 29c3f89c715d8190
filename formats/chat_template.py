"""The AM-thinking chat template and LLaMA-Factory's SFT encoding of it (the recipe's, exactly).

This module is the single definition of the template: the preprocessor encodes with it
(`pieces` + `assemble`), and the exporter installs it in the HF release as a Jinja `chat_template`
(`jinja`). The encoding reproduces LLaMA-Factory 0.9.3's supervised
preprocessing for the K2-Think template:

* each slot string is tokenised on its own (no special tokens added) and the ids are concatenated;
* the system slot precedes only the first user turn; an absent or empty system text falls back to
  the default AM-thinking prompt;
* conversations are (source, target) pairs: source = [system slot +] user slot (which ends with the
  assistant header), target = assistant slot (text + `<|im_end|>\\n`); targets are trained, sources
  are masked;
* truncation (`infer_seqlen`) is per pair with a remaining budget, keeping the head of each part;
  later pairs are dropped once the budget is spent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InputError

AM_THINKING_DEFAULT_SYSTEM = (
    "You are a helpful assistant. To answer the user's question, you first think about the reasoning "
    "process and then provide the user with the answer. The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>."
)


@dataclass(frozen=True)
class ChatTemplate:
    """A LLaMA-Factory-style template: three slots with a `{content}` placeholder and a default system."""

    name: str
    system_slot: str
    user_slot: str  # ends with the assistant header, as in LLaMA-Factory
    assistant_slot: str
    assistant_header: str
    default_system: str
    stop_token: str

    def __post_init__(self):
        if not self.user_slot.endswith(self.assistant_header):
            raise ValueError(
                f"{self.name}: the user slot must end with the assistant header {self.assistant_header!r}"
            )

    def system_text(self, system: str | None) -> str:
        return system or self.default_system

    def pieces(self, system: str | None, turns: Sequence[str]) -> list[str]:
        """Slot strings in order: the system slot, then one per turn (user, assistant, user, ...).

        Each piece is tokenised separately; pair k's source is pieces[2k+1] (plus pieces[0] for k=0)
        and its target pieces[2k+2].
        """
        slots = (self.user_slot, self.assistant_slot)
        out = [_fill(self.system_slot, self.system_text(system))]
        out.extend(_fill(slots[i % 2], text) for i, text in enumerate(turns))
        return out

    def jinja(self) -> str:
        """The template as a transformers `chat_template` (roles system/user/assistant).

        A whole conversation renders to exactly the concatenated `pieces()`. The assistant header is
        emitted before each assistant message, or at the end with `add_generation_prompt=True`, so
        prompts for generation end with it as in training.
        """
        header = self.assistant_header
        user_open, user_close = _split(self.user_slot[: -len(header)])
        sys_open, sys_close = _split(self.system_slot)
        asst_open, asst_close = _split(self.assistant_slot)
        q = json.dumps
        return (
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
            "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
            "{%- if not system_message -%}"
            f"{{%- set system_message = {q(self.default_system)} -%}}"
            "{%- endif -%}"
            f"{{{{- {q(sys_open)} + system_message + {q(sys_close)} -}}}}"
            "{%- for message in loop_messages -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{{{- {q(user_open)} + message['content'] + {q(user_close)} -}}}}"
            "{%- elif message['role'] == 'assistant' -%}"
            f"{{{{- {q(header)} + {q(asst_open)} + message['content'] + {q(asst_close)} -}}}}"
            "{%- else -%}{{- raise_exception('AM-thinking template: unsupported role ' + message['role']) -}}"
            "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- {q(header)} -}}}}{{%- endif -%}}"
        )


def _fill(slot: str, content: str) -> str:
    return slot.replace("{content}", content, 1)


def _split(slot: str) -> tuple[str, str]:
    head, _, tail = slot.partition("{content}")
    return head, tail


AM_THINKING = ChatTemplate(
    name="AM-thinking",
    system_slot="<|im_start|>system\n{content}<|im_end|>\n",
    user_slot="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_slot="{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    default_system=AM_THINKING_DEFAULT_SYSTEM,
    stop_token="<|im_end|>",
)


# Every template by the name a dataset's meta records (`template`) and the exporter's --chat-template takes.
TEMPLATES = {template.name: template for template in (AM_THINKING,)}


def template_named(name: str, source: str = "--chat-template") -> ChatTemplate:
    if name not in TEMPLATES:
        raise InputError(
            f"{source}: chat template {name!r} is unknown; the templates are {', '.join(TEMPLATES)}"
        )
    return TEMPLATES[name]


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's budget split for one (source, target) pair; returns the kept lengths.

    The float expression in the last branch is deliberate: it is LLaMA-Factory's, and an integer
    formula would round differently in rare cases.
    """
    if target_len * 2 < cutoff_len:  # short target: it may use the whole budget
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # short source: the target gets the rest
        max_target_len = cutoff_len - source_len
    else:  # both long: split the budget in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def assemble(piece_ids: Sequence[Sequence[int]], cutoff_len: int) -> tuple[list[int], list[int], int]:
    """Joins tokenised pieces (see `ChatTemplate.pieces`) into ids + loss mask, truncating per pair.

    Returns (ids, mask, full_length) where full_length is the untruncated token count.
    """
    if len(piece_ids) < 3 or len(piece_ids) % 2 == 0:
        raise ValueError("expected a system piece followed by (user, assistant) pairs")
    ids: list[int] = []
    mask: list[int] = []
    full_length = sum(len(p) for p in piece_ids)
    total = 0
    for k in range(1, len(piece_ids), 2):
        if total >= cutoff_len:
            break
        source = list(piece_ids[k]) if k > 1 else [*piece_ids[0], *piece_ids[1]]
        target = piece_ids[k + 1]
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        ids += source[:source_len]
        ids += target[:target_len]
        mask += [0] * source_len
        mask += [1] * target_len
        total += source_len + target_len
    return ids, mask, full_length
