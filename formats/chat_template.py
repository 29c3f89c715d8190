"""The chat templates a dataset is encoded with, by name, as LLaMA-Factory 0.9.3 writes them.

This module is the single definition of each template: the preprocessor renders conversations with it
(`ChatTemplate.render`: per message, the strings LLaMA-Factory tokenises one by one), and the exporter
installs it in the HF release as a Jinja `chat_template` (`jinja`). The templates:

* `AM-thinking` (the recipe's): Qwen's ChatML slots with the recipe's default system prompt;
* `qwen`: the same slots, default system "You are Qwen, created by Alibaba Cloud. ...";
* `qwen3`: the same slots, no default system, and LLaMA-Factory's reasoning rule: an assistant turn
  without a `<think>` block gets an empty one (trained with the turn); with `enable_thinking=False`
  every turn's thoughts are removed and the empty block goes, untrained, into the prompt;
* `llama3`: Llama 3's header tokens and `<|eot_id|>`, the tokenizer's bos first.

The rules they share, from LLaMA-Factory's `Template._encode`: the system text (else the default)
precedes the first message, and is written only when it or the row's tools are non-empty (the tools
are appended to it); user turns end with the assistant header; observation (tool result) and
function-call turns have their own slots (`formats.tool_calls` writes tools and calls in the
template's tool format). Messages alternate user/observation and assistant/function, so message
2k + 1 answers message 2k: pair k's source and target.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InputError

from .tool_calls import function_call_text, jinja_function_call, jinja_tool_prompt, tool_prompt

USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
ROLES = (USER, ASSISTANT, OBSERVATION, FUNCTION)

AM_THINKING_DEFAULT_SYSTEM = (
    "You are a helpful assistant. To answer the user's question, you first think about the reasoning "
    "process and then provide the user with the answer. The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>."
)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
THOUGHT_OPEN, THOUGHT_CLOSE = "<think>", "</think>"
EMPTY_THOUGHT = f"{THOUGHT_OPEN}\n\n{THOUGHT_CLOSE}\n\n"
_THOUGHT_BLOCK = re.compile(f"{re.escape(THOUGHT_OPEN)}(.*?){re.escape(THOUGHT_CLOSE)}", re.DOTALL)


@dataclass(frozen=True)
class ChatTemplate:
    """A LLaMA-Factory-style template: slots with a `{content}` placeholder, a default system, a stop."""

    name: str
    system_slot: str
    user_slot: str  # ends with the assistant header, as in LLaMA-Factory
    assistant_slot: str
    observation_slot: str  # a tool's result; ends with the assistant header too
    function_slot: str  # an assistant's function call, written by `tool_format`
    assistant_header: str
    default_system: str
    stop_token: str  # ends every assistant turn: the release's EOS
    tool_format: str  # "qwen" or "llama3" (formats.tool_calls)
    bos_first: bool = False  # the tokenizer's bos token opens every conversation
    reasoning: bool = False  # LLaMA-Factory's ReasoningTemplate: empty <think> blocks where none
    # Further tokens generation stops at (LLaMA-Factory adds them to the tokenizer as special tokens).
    extra_stop_tokens: tuple[str, ...] = ()

    def __post_init__(self):
        for slot in (self.user_slot, self.observation_slot):
            if not slot.endswith(self.assistant_header):
                raise ValueError(f"{self.name}: {slot!r} must end with the assistant header")

    def render(
        self,
        system: str | None,
        tools: str | None,
        messages: Sequence[tuple[str, str]],
        *,
        bos_token: str | None = None,
        enable_thinking: bool = True,
        tool_date: str = "",
    ) -> list[list[str]]:
        """Per message (role, content), the strings LLaMA-Factory tokenises one by one, in order.

        `bos_token` is the tokenizer's (None when it has none: then nothing is written for it);
        `tool_date` is the date llama3's tool prompt names. Raises `tool_calls.NotExpressible` for
        tools or a function call the template cannot write.
        """
        if self.reasoning and not enable_thinking:
            messages = [
                (role, _remove_thought(text) if i % 2 else text) for i, (role, text) in enumerate(messages)
            ]
        system = system or self.default_system
        rendered = []
        for i, (role, content) in enumerate(messages):
            pieces = []
            if i == 0:
                if self.bos_first and bos_token:
                    pieces.append(bos_token)
                if system or tools:
                    tool_text = tool_prompt(self.tool_format, tools, tool_date) if tools else ""
                    pieces.append(_fill(self.system_slot, system + tool_text))
            pieces.append(self._message_text(role, content))
            rendered.append(pieces)
        if self.reasoning:
            self._add_empty_thoughts(messages, rendered, enable_thinking)
        return [[piece for piece in pieces if piece] for pieces in rendered]

    def _message_text(self, role: str, content: str) -> str:
        if role == FUNCTION:
            return _fill(self.function_slot, function_call_text(self.tool_format, content))
        slot = {USER: self.user_slot, ASSISTANT: self.assistant_slot, OBSERVATION: self.observation_slot}[
            role
        ]
        return _fill(slot, content)

    @staticmethod
    def _add_empty_thoughts(messages, rendered: list[list[str]], enable_thinking: bool) -> None:
        for k in range(0, len(messages), 2):
            answer = messages[k + 1][1]
            if THOUGHT_OPEN not in answer and THOUGHT_CLOSE not in answer:
                if enable_thinking:  # trained, as the start of the answer
                    rendered[k + 1].insert(0, EMPTY_THOUGHT)
                else:  # untrained, at the end of the prompt
                    rendered[k].append(EMPTY_THOUGHT)

    @property
    def stop_tokens(self) -> tuple[str, ...]:
        return (self.stop_token, *self.extra_stop_tokens)

    def jinja(self, enable_thinking: bool = True) -> str:
        """The template as a transformers `chat_template`.

        Roles: system (first only), user, assistant (with OpenAI-style `tool_calls`: its content, e.g. a
        thought, then the calls, as a function turn), tool (an observation turn); `tools` go into the
        system turn as in training. A conversation renders to exactly the concatenated `render()`
        strings. The assistant header is written before each assistant message, or at the end with
        `add_generation_prompt=True`, so prompts for generation end with it as in training. A reasoning
        template reads `enable_thinking` (its default: the one given here, the data's setting), and
        without thinking drops every thought and ends the prompt with the empty one, as in training.
        """
        q = json.dumps
        header = self.assistant_header
        user_open, user_close = _split(self.user_slot[: -len(header)])
        tool_open, tool_close = _split(self.observation_slot[: -len(header)])
        sys_open, sys_close = _split(self.system_slot)
        asst_open, asst_close = _split(self.assistant_slot)
        call_open, call_close = _split(self.function_slot)
        parts = [
            "{%- set ns = namespace(tool_text='', calls='', objects=[], rest='', kept='') -%}",
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}",
            "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}",
        ]
        if self.reasoning:
            parts.append(
                "{%- if enable_thinking is not defined -%}"
                f"{{%- set enable_thinking = {q(enable_thinking)} -%}}{{%- endif -%}}"
            )
        if self.bos_first:
            parts.append("{{- bos_token -}}")
        if self.default_system:
            parts.append(
                f"{{%- if not system_message -%}}{{%- set system_message = {q(self.default_system)} -%}}"
                "{%- endif -%}"
            )
        parts += [
            "{%- if tools -%}" + jinja_tool_prompt(self.tool_format) + "{%- endif -%}",
            # as in training, a tool list makes a system turn even when empty (LLaMA-Factory tests the
            # row's JSON string, "[]" included)
            "{%- if system_message or (tools is defined and tools is not none) -%}",
            f"{{{{- {q(sys_open)} + system_message + ns.tool_text + {q(sys_close)} -}}}}",
            "{%- endif -%}",
            "{%- for message in loop_messages -%}",
            "{%- set content = message['content'] if message['content'] is string else '' -%}",
            "{%- if message['content'] is defined and message['content'] is not none "
            "and message['content'] is not string -%}",
            f"{{{{- raise_exception({q(self.name + ' template: message content must be text, not ')} + "
            "(message['content'] | string)) -}}",
            "{%- endif -%}",
            "{%- if message['role'] == 'user' -%}",
            f"{{{{- {q(user_open)} + content + {q(user_close)} -}}}}",
            "{%- elif message['role'] == 'tool' -%}",
            f"{{{{- {q(tool_open)} + content + {q(tool_close)} -}}}}",
            "{%- elif message['role'] == 'assistant' -%}",
        ]
        if self.reasoning:  # the thoughts training removed, and the empty one it added where none
            parts += [
                "{%- if not enable_thinking -%}" + _JINJA_REMOVE_THOUGHTS + "{%- endif -%}",
                f"{{%- if {q(THOUGHT_OPEN)} not in content and {q(THOUGHT_CLOSE)} not in content -%}}"
                f"{{%- set content = {q(EMPTY_THOUGHT)} + content -%}}{{%- endif -%}}",
            ]
        parts += [
            "{%- if message['tool_calls'] -%}" + jinja_function_call(self.tool_format),
            f"{{{{- {q(header)} + {q(call_open)} + content + ns.calls + {q(call_close)} -}}}}",
            f"{{%- else -%}}{{{{- {q(header)} + {q(asst_open)} + content + {q(asst_close)} -}}}}",
            "{%- endif -%}",
            f"{{%- else -%}}{{{{- raise_exception({q(self.name + ' template: unsupported role ')} + "
            "message['role']) -}}",
            "{%- endif -%}{%- endfor -%}",
            f"{{%- if add_generation_prompt -%}}{{{{- {q(header)} -}}}}",
        ]
        if self.reasoning:
            parts.append(f"{{%- if not enable_thinking -%}}{{{{- {q(EMPTY_THOUGHT)} -}}}}{{%- endif -%}}")
        parts.append("{%- endif -%}")
        return "".join(parts)


# `_remove_thought` in Jinja (no regular expressions there): each <think> block cut up to the first
# </think> after it, then the leading newlines.
_JINJA_REMOVE_THOUGHTS = (
    "{%- set ns.rest = content -%}{%- set ns.kept = '' -%}"
    f"{{%- for _ in range(content.count({json.dumps(THOUGHT_OPEN)})) -%}}"
    f"{{%- set start = ns.rest.find({json.dumps(THOUGHT_OPEN)}) -%}}"
    f"{{%- set end = ns.rest.find({json.dumps(THOUGHT_CLOSE)}, start + {len(THOUGHT_OPEN)}) -%}}"
    "{%- if end < 0 -%}{%- break -%}{%- endif -%}"
    "{%- set ns.kept = ns.kept + ns.rest[:start] -%}"
    f"{{%- set ns.rest = ns.rest[end + {len(THOUGHT_CLOSE)}:] -%}}"
    "{%- endfor -%}"
    "{%- set content = (ns.kept + ns.rest).lstrip('\\n') -%}"
)


def _fill(slot: str, content: str) -> str:
    return slot.replace("{content}", content, 1)


def _split(slot: str) -> tuple[str, str]:
    head, _, tail = slot.partition("{content}")
    return head, tail


def _remove_thought(text: str) -> str:
    return _THOUGHT_BLOCK.sub("", text).lstrip("\n")


_CHATML = dict(
    system_slot="<|im_start|>system\n{content}<|im_end|>\n",
    user_slot="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
    assistant_slot="{content}<|im_end|>\n",
    observation_slot="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n",
    function_slot="{content}<|im_end|>\n",
    assistant_header="<|im_start|>assistant\n",
    stop_token="<|im_end|>",
    tool_format="qwen",
)
AM_THINKING = ChatTemplate(name="AM-thinking", default_system=AM_THINKING_DEFAULT_SYSTEM, **_CHATML)
QWEN = ChatTemplate(name="qwen", default_system=QWEN_DEFAULT_SYSTEM, **_CHATML)
QWEN3 = ChatTemplate(name="qwen3", default_system="", reasoning=True, **_CHATML)
LLAMA3 = ChatTemplate(
    name="llama3",
    system_slot="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user_slot="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    assistant_slot="{content}<|eot_id|>",
    observation_slot="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    function_slot="{content}<|eot_id|>",
    assistant_header="<|start_header_id|>assistant<|end_header_id|>\n\n",
    default_system="",
    stop_token="<|eot_id|>",
    tool_format="llama3",
    bos_first=True,
    extra_stop_tokens=("<|eom_id|>",),
)


# Every template by the name `--template` takes, a dataset's meta records and the exporter's
# --chat-template takes; the first is the default.
TEMPLATES = {template.name: template for template in (AM_THINKING, QWEN, QWEN3, LLAMA3)}
TEMPLATE_ALIASES = {"am-thinking": AM_THINKING.name}  # the spelling of the issue and LLaMA-Factory users


def template_named(name: str, source: str = "--chat-template") -> ChatTemplate:
    name = TEMPLATE_ALIASES.get(name, name)
    if name not in TEMPLATES:
        raise InputError(
            f"{source}: chat template {name!r} is unknown; the templates are {', '.join(TEMPLATES)}"
        )
    return TEMPLATES[name]
