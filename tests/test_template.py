"""The AM-thinking template: text, token ids and loss mask as LLaMA-Factory 0.9.3 builds them, its
per-turn truncation on hand-worked cases, and the Jinja chat template for HF tokenizers.

Expected values are written out here from the recipe (slot strings, default system prompt) and
tokenised slot by slot with the HF tokenizer, independently of `formats.chat_template`.
"""

from __future__ import annotations

import pytest

from formats.chat_template import AM_THINKING, LLAMA3, QWEN, QWEN3, TEMPLATES, template_named
from preprocess.sft_encoding import encode_pairs, infer_seqlen
from testing.template_text import as_messages, render

# The recipe's default system prompt, copied from its README.
RECIPE_SYSTEM = (
    "You are a helpful assistant. To answer the user's question, you first think about the reasoning process "
    "and then provide the user with the answer. The reasoning process and answer are enclosed within <think> "
    "</think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>."
)
NO_LIMIT = 10**9


def encoder_for(tokenizer):
    """Each message's strings tokenised one by one and joined; messages paired (source, target)."""

    def encode_messages(messages):
        ids = [
            [t for piece in message for t in tokenizer.encode(piece, add_special_tokens=False)]
            for message in messages
        ]
        return list(zip(ids[::2], ids[1::2], strict=True))

    return encode_messages


def encode(encoder, system, turns, cutoff_len):
    """What the preprocessor does with one conversation: template strings, tokenised, encoded."""
    return encode_pairs(encoder(AM_THINKING.render(system, None, as_messages(turns))), cutoff_len)


def expected(tokenizer, system: str, turns: list[str]) -> tuple[list[int], list[int]]:
    """ids and mask from literal slot strings, each tokenised on its own (LLaMA-Factory's way)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    ids = enc(f"<|im_start|>system\n{system}<|im_end|>\n")
    mask = [0] * len(ids)
    for i, text in enumerate(turns):
        if i % 2 == 0:
            piece = enc(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")
        else:
            piece = enc(f"{text}<|im_end|>\n")
        ids += piece
        mask += [i % 2] * len(piece)
    return ids, mask


def test_default_system_is_the_recipes():
    assert AM_THINKING.default_system == RECIPE_SYSTEM


def test_single_turn_ids_and_mask(qwen_tokenizer):
    turns = ["What is 2+2?", "<think>\n2+2 is 4.\n</think> <answer>\n4\n</answer>"]
    ids, mask, full = encode(encoder_for(qwen_tokenizer), None, turns, NO_LIMIT)
    assert (ids, mask) == expected(qwen_tokenizer, RECIPE_SYSTEM, turns)
    assert full == len(ids)
    # Trained tokens are exactly the answer plus its <|im_end|>\n; the assistant header is not trained.
    trained = [t for t, m in zip(ids, mask, strict=True) if m]
    assert qwen_tokenizer.decode(trained) == turns[1] + "<|im_end|>\n"
    assert qwen_tokenizer.decode(ids[: mask.index(1)]).endswith("<|im_start|>assistant\n")
    assert ids[0] == qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS


@pytest.mark.parametrize("system", [None, "", "You are a patient tutor."])
def test_multi_turn_with_system(qwen_tokenizer, system):
    turns = [
        "Привет! 设 x=1.",
        "<think>a</think> <answer>b</answer>",
        "and then? 🙂",
        "<think>c</think> <answer>d</answer>",
    ]
    ids, mask, _ = encode(encoder_for(qwen_tokenizer), system, turns, NO_LIMIT)
    assert (ids, mask) == expected(qwen_tokenizer, system or RECIPE_SYSTEM, turns)  # empty falls back
    assert sum(mask) == sum(
        len(qwen_tokenizer.encode(t + "<|im_end|>\n", add_special_tokens=False)) for t in turns[1::2]
    )
    assert qwen_tokenizer.decode(ids) == render(AM_THINKING, system, turns)


def test_slots_are_tokenised_separately(qwen_tokenizer):
    # Tokenised as one string, the header's "\n" and the answer's leading "\n\n" merge into one token;
    # LLaMA-Factory tokenises each slot on its own, so the ids differ from the joined text's.
    turns = ["q", "\n\nanswer"]
    ids, _, _ = encode(encoder_for(qwen_tokenizer), None, turns, NO_LIMIT)
    joined = qwen_tokenizer.encode(render(AM_THINKING, None, turns), add_special_tokens=False)
    assert ids == expected(qwen_tokenizer, RECIPE_SYSTEM, turns)[0]
    assert ids != joined  # "assistant\n" + "\n\nanswer" tokenise differently when joined


@pytest.mark.parametrize(
    "source, target, cutoff, kept",
    [
        (10, 3, 20, (10, 3)),  # fits: nothing cut
        (10, 10, 20, (10, 10)),  # fits exactly, through the proportional branch
        (100, 10, 50, (40, 10)),  # short target keeps all; the source takes the rest
        (10, 100, 50, (10, 40)),  # short source keeps all; the target takes the rest
        (30, 100, 50, (12, 38)),  # both long: target int(50 * 100/130) = 38
        (100, 100, 7, (4, 3)),  # int(3.5) = 3
        (5, 5, 0, (0, 0)),
        (300, 1, 2, (2, 0)),  # int(2 * 1/301) = 0 target tokens; the source fills the budget
    ],
)
def test_infer_seqlen_hand_worked(source, target, cutoff, kept):
    assert infer_seqlen(source, target, cutoff) == kept


def test_encode_pairs_truncates_per_turn_with_a_remaining_budget():
    pieces = [
        ([1, 2, 3, 4, 5], [6, 7, 8, 9]),
        ([10, 11], [12, 13, 14]),
    ]  # (system + user, asst), (user, asst)
    # cutoff 12: pair 1 (S=5, T=4) fits; pair 2 gets budget 3: S=2, T=3 -> int(3 * 3/5) = 1 target token.
    ids, mask, full = encode_pairs(pieces, 12)
    assert ids == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 1]
    assert full == 14
    # cutoff 9: pair 1 uses the whole budget, pair 2 is dropped.
    assert encode_pairs(pieces, 9)[:2] == ([1, 2, 3, 4, 5, 6, 7, 8, 9], [0] * 5 + [1] * 4)
    # cutoff 6: pair 1 alone is too long: 2T = 8 >= 6, 2S = 10 >= 6 -> T = int(6 * 4/9) = 2, S = 4.
    assert encode_pairs(pieces, 6)[:2] == ([1, 2, 3, 4, 6, 7], [0, 0, 0, 0, 1, 1])
    # Nothing to cut: identical to the untruncated concatenation.
    ids, mask, full = encode_pairs(pieces, 14)
    assert ids == list(range(1, 15)) and full == 14


def test_truncation_keeps_heads_and_loses_trailing_im_end(qwen_tokenizer):
    long_answer = "<think>" + " step" * 400 + "</think> <answer>42</answer>"
    turns = ["short question", long_answer]
    full_ids, full_mask = expected(qwen_tokenizer, RECIPE_SYSTEM, turns)
    cutoff = 300
    ids, mask, full = encode(encoder_for(qwen_tokenizer), None, turns, cutoff)
    source_len = full_mask.index(1)
    assert full == len(full_ids) > cutoff
    assert len(ids) == cutoff  # short source: the target takes cutoff - source
    assert ids == full_ids[:cutoff] and mask == full_mask[:cutoff]
    assert sum(mask) == cutoff - source_len
    assert ids[-1] != qwen_tokenizer.convert_tokens_to_ids("<|im_end|>")


def _hf_with_template(tokenizer):
    import copy

    tok = copy.copy(tokenizer)
    tok.chat_template = AM_THINKING.jinja()
    return tok


@pytest.mark.parametrize("system", [None, "", "Be brief."])
def test_jinja_renders_exactly_the_encoded_text(qwen_tokenizer, system):
    tok = _hf_with_template(qwen_tokenizer)
    turns = [
        "Q1 with {braces} and 'quotes' \"and\" \\ backslash",
        "<think>x</think> <answer>1</answer>",
        "Q2 ✓",
        "A2",
    ]
    messages = ([] if system is None else [{"role": "system", "content": system}]) + [
        {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == render(AM_THINKING, system, turns)
    expected_text = "".join(
        [f"<|im_start|>system\n{system or RECIPE_SYSTEM}<|im_end|>\n"]
        + [
            f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n" if i % 2 == 0 else f"{t}<|im_end|>\n"
            for i, t in enumerate(turns)
        ]
    )
    assert text == expected_text
    ids, _, _ = encode(encoder_for(qwen_tokenizer), system, turns, NO_LIMIT)
    assert qwen_tokenizer.decode(ids) == text


def test_jinja_generation_prompt_matches_training_prefix(qwen_tokenizer):
    tok = _hf_with_template(qwen_tokenizer)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert (
        prompt == f"<|im_start|>system\n{RECIPE_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(Exception, match="unsupported role developer"):
        tok.apply_chat_template([{"role": "developer", "content": "x"}], tokenize=False)


# The other templates' text, written out from LLaMA-Factory 0.9.3's registrations (template.py).
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
TURNS = ["Q1", "<think>t</think>\n\nA1", "Q2", "A2"]


def chatml(system, turns, answers=None):
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    answers = answers or turns[1::2]
    return head + "".join(
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
        for q, a in zip(turns[::2], answers, strict=True)
    )


@pytest.mark.parametrize(
    "template, system, text",
    [
        (QWEN, None, chatml(QWEN_SYSTEM, TURNS)),
        (QWEN, "Mine.", chatml("Mine.", TURNS)),
        # qwen3: no default system (no system turn at all); an answer without a thought gets an empty one.
        (QWEN3, None, chatml(None, TURNS, ["<think>t</think>\n\nA1", "<think>\n\n</think>\n\nA2"])),
        (
            LLAMA3,
            "Sys.",
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSys.<|eot_id|>"
            + "".join(
                f"<|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
                f"<|start_header_id|>assistant<|end_header_id|>\n\n{a}<|eot_id|>"
                for q, a in zip(TURNS[::2], TURNS[1::2], strict=True)
            ),
        ),
    ],
    ids=["qwen", "qwen-system", "qwen3", "llama3"],
)
def test_templates_text_and_jinja(template, system, text, qwen_tokenizer, llama3_tokenizer_dir):
    from formats.tokenizer import load_tokenizer

    bos = "<|begin_of_text|>" if template.bos_first else None
    assert render(template, system, TURNS, bos_token=bos) == text
    tokenizer = load_tokenizer(llama3_tokenizer_dir) if template.bos_first else qwen_tokenizer
    hf = __import__("copy").copy(tokenizer)
    hf.chat_template = template.jinja()
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(TURNS)
    ]
    assert hf.apply_chat_template(messages, tokenize=False) == text


def test_qwen3_without_thinking_moves_the_empty_thought_into_the_prompt():
    messages = QWEN3.render(None, None, as_messages(TURNS), enable_thinking=False)
    # Every thought removed (history included); each prompt ends with an empty, untrained one.
    assert messages == [
        ["<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\n"],
        ["A1<|im_end|>\n"],
        ["<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\n"],
        ["A2<|im_end|>\n"],
    ]


def test_tools_and_function_calls_in_the_qwen_format():
    tools = '[{"name": "f", "parameters": {}}]'
    call = '{"name": "f", "arguments": {"x": 1}}'
    messages = [("user", "q"), ("function", call), ("observation", "42"), ("assistant", "done")]
    rendered = QWEN3.render("", tools, messages)
    system = rendered[0][0]
    assert system.startswith("<|im_start|>system\n\n\n# Tools\n") and system.endswith(
        "</tool_call><|im_end|>\n"
    )
    assert '\n{"type": "function", "function": {"name": "f", "parameters": {}}}\n</tools>' in system
    assert rendered[1] == [
        "<think>\n\n</think>\n\n",
        '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call><|im_end|>\n',
    ]
    assert rendered[2] == [
        "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ]


@pytest.mark.parametrize(
    "tools, call, reason",
    [
        ("not json", '{"name": "f", "arguments": {}}', "invalid_tools"),
        ('{"name": "f"}', '{"name": "f", "arguments": {}}', "invalid_tools"),  # an object, not a list
        ("[]", "plain text, not a call", "invalid_function_call"),
        ("[]", '{"name": "f"}', "invalid_function_call"),  # no arguments
    ],
)
def test_what_a_template_cannot_write_names_its_reason(tools, call, reason):
    from formats.tool_calls import NotExpressible

    with pytest.raises(NotExpressible) as raised:
        QWEN.render(None, tools, [("user", "q"), ("function", call)])
    assert raised.value.reason == reason


def test_templates_by_name():
    assert list(TEMPLATES) == ["AM-thinking", "qwen", "qwen3", "llama3"]
    assert template_named("am-thinking") is AM_THINKING  # the issue's and LLaMA-Factory users' spelling
    with pytest.raises(Exception, match="unknown; the templates are AM-thinking, qwen, qwen3, llama3"):
        template_named("chatml")
