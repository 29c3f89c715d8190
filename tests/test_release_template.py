"""The release's chat template (Jinja, as transformers and vLLM render it) against what training saw.

Every conversation of the LLaMA-Factory parity datasets (tests/data/llamafactory: alpaca with history,
sharegpt with tools, parallel function calls and observations, OpenAI-style messages, reasoning
traces), as OpenAI-style messages (testing/hf_messages.py), renders through each template's Jinja to
exactly the text the preprocessor encodes; and that text is LLaMA-Factory's own, read back from its
golden token ids (testing/llamafactory_golden.py) for every example it did not truncate.
"""

from __future__ import annotations

import copy
import datetime
from collections import Counter

import pytest

from formats.chat_template import TEMPLATES
from preprocess.converters import Example, converter_for
from preprocess.registry import dataset_entries
from preprocess.source import RegistrySource
from testing.hf_messages import hf_conversation
from testing.llamafactory_golden import CASES, DATA_DIR, DATASETS, SEED, SEQ_LENGTH, read_golden

# The cases whose text differs (the loss options change only the masks); two in the fast suite.
TEXT_CASES = ("am_thinking", "qwen", "qwen3", "qwen3_no_thinking", "llama3")
FAST_CASES = ("qwen3_no_thinking", "llama3")


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    entries = dataset_entries(DATA_DIR / "dataset_info.json", list(DATASETS))
    kept = []
    for batch in RegistrySource(tuple(entries), seed=SEED).batches():
        convert = converter_for(entries[batch.dataset])
        kept += [e for e in map(convert, batch.to_rows()) if isinstance(e, Example)]
    return kept


def _release_tokenizer(case, qwen_tokenizer_dir, llama3_tokenizer_dir):
    from convert.mcore_to_hf import load_release_tokenizer

    template_name, kind, options = CASES[case]
    directory = {"qwen": qwen_tokenizer_dir, "llama3": llama3_tokenizer_dir}[kind]
    thinking = options.get("enable_thinking", True)
    tokenizer, _ = load_release_tokenizer(directory, TEMPLATES[template_name], thinking)
    return TEMPLATES[template_name], tokenizer, thinking


@pytest.mark.parametrize(
    "case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in TEXT_CASES]
)
def test_the_release_template_renders_what_training_encoded(
    case, examples, qwen_tokenizer_dir, llama3_tokenizer_dir
):
    template, tokenizer, thinking = _release_tokenizer(case, qwen_tokenizer_dir, llama3_tokenizer_dir)
    header, golden = read_golden(case)
    date = header["tool_date"]
    rendered = Counter()
    for example in examples:
        pieces = template.render(
            example.system,
            example.tools,
            example.messages,
            bos_token=tokenizer.bos_token,
            enable_thinking=thinking,
            tool_date=date,
        )
        trained = "".join(piece for message in pieces for piece in message)
        messages, tools = hf_conversation(example)
        served = tokenizer.apply_chat_template(messages, tools=tools, date_string=date, tokenize=False)
        assert served == trained, f"{case}: {messages}"
        rendered[served] += 1
    assert any(m["role"] == "tool" for e in examples for m in hf_conversation(e)[0])
    assert any(len(m.get("tool_calls", [])) > 1 for e in examples for m in hf_conversation(e)[0])

    # LLaMA-Factory's text of each example it kept, but those it truncated to its cutoff
    theirs = Counter(tokenizer.decode(ids, clean_up_tokenization_spaces=False) for ids, _ in golden)
    cutoff = SEQ_LENGTH - 1
    truncated = sum(
        n for text, n in rendered.items() if len(tokenizer(text, add_special_tokens=False).input_ids) > cutoff
    )
    assert truncated >= 2 and sum(theirs.values()) == sum(rendered.values())
    assert sum((theirs & rendered).values()) == len(golden) - truncated


def _with_template(tokenizer, template, enable_thinking=True):
    served = copy.copy(tokenizer)
    served.chat_template = template.jinja(enable_thinking)
    return served


def test_the_generation_prompt_and_enable_thinking(qwen_tokenizer):
    qwen3 = TEMPLATES["qwen3"]
    question = [{"role": "user", "content": "Q"}]
    thinking, quiet = _with_template(qwen_tokenizer, qwen3), _with_template(qwen_tokenizer, qwen3, False)
    prompt = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    empty = "<think>\n\n</think>\n\n"
    assert thinking.apply_chat_template(question, add_generation_prompt=True, tokenize=False) == prompt
    # without thinking (the data's setting, or the caller's), the prompt ends with the empty thought
    assert quiet.apply_chat_template(question, add_generation_prompt=True, tokenize=False) == prompt + empty
    assert (
        thinking.apply_chat_template(
            question, add_generation_prompt=True, enable_thinking=False, tokenize=False
        )
        == prompt + empty
    )
    # and every thought of the history is dropped, as training dropped them
    history = [*question, {"role": "assistant", "content": "<think>a</think>\n\nA<think>b</think>c"}]
    assert quiet.apply_chat_template(history, tokenize=False) == prompt + empty + "Ac<|im_end|>\n"
    # llama3 dates its tool prompt today where the caller gives no date_string, as LLaMA-Factory does
    llama3 = _with_template(qwen_tokenizer, TEMPLATES["llama3"])
    text = llama3.apply_chat_template(question, tools=[{"name": "f", "parameters": {}}], tokenize=False)
    assert f"Today Date: {datetime.date.today().strftime('%d %b %Y')}\n" in text


def test_what_the_release_template_refuses(qwen_tokenizer):
    tokenizer = _with_template(qwen_tokenizer, TEMPLATES["qwen"])
    for messages, message in (
        (
            [{"role": "user", "content": "Q"}, {"role": "system", "content": "late"}],
            "unsupported role system",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": "Q"}]}], "content must be text"),
    ):
        with pytest.raises(Exception, match=message):
            tokenizer.apply_chat_template(messages, tokenize=False)
