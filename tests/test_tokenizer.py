"""The offline Qwen2.5 tokenizer fixture agrees with tiktoken run on the same BPE ranks and regex."""

from __future__ import annotations

import json
import random
import re
import unicodedata

import pytest

from testing.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    QWEN25_ADDED_TOKENS,
    QWEN25_PRETOKENIZE_REGEX,
    qwen_tiktoken_ranks_file,
)

_BLOCKS = [
    (0x20, 0x7E),
    (0xA0, 0x24F),
    (0x300, 0x36F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x590, 0x6FF),
    (0x900, 0x97F),
    (0x3040, 0x30FF),
    (0x4E00, 0x4FFF),
    (0xAC00, 0xAD00),
    (0x1F300, 0x1F64F),
    (0x2200, 0x22FF),
]
_WHITESPACE = [" ", "  ", "\n", "\n\n", "\t", "\r\n", " \n ", "   \t"]


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 40)):
        kind = rng.random()
        if kind < 0.2:
            parts.append(rng.choice(_WHITESPACE))
        elif kind < 0.3:
            parts.append(str(rng.randint(0, 10**9)))
        elif kind < 0.35:
            parts.append(rng.choice(QWEN25_ADDED_TOKENS)[0])
        elif kind < 0.45:
            parts.append(
                rng.choice(["'s", "'LL", "don't", "<think>", "</answer>", "```python", "x**2", "=>"])
            )
        else:
            lo, hi = rng.choice(_BLOCKS)
            parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12))))
    return "".join(parts)


@pytest.fixture(scope="module")
def tiktoken_reference():
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_tiktoken_ranks_file()))
    specials = {content: i for i, (content, _) in enumerate(QWEN25_ADDED_TOKENS, start=151643)}
    enc = tiktoken.Encoding(
        "qwen2.5", pat_str=QWEN25_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens=specials
    )
    return enc, ranks


_ADDED_SPLIT = re.compile("(" + "|".join(re.escape(c) for c, _ in QWEN25_ADDED_TOKENS) + ")")


def _reference_ids(enc, text: str) -> list[int]:
    """tiktoken's ids for `text` as a Qwen2.5 tokenizer must see it: added tokens are matched on the raw
    text, and only the text between them is NFC-normalised (tiktoken itself does not normalise)."""
    ids: list[int] = []
    for i, part in enumerate(_ADDED_SPLIT.split(text)):
        if i % 2:
            ids.append(enc.encode_single_token(part))
        elif part:
            ids += enc.encode_ordinary(unicodedata.normalize("NFC", part))
    return ids


def test_vocabulary_layout(qwen_tokenizer, qwen_tokenizer_dir):
    assert len(qwen_tokenizer) == 151665
    for i, (content, special) in enumerate(QWEN25_ADDED_TOKENS, start=151643):
        assert qwen_tokenizer.convert_tokens_to_ids(content) == i
        assert qwen_tokenizer.added_tokens_decoder[i].special == special
    assert qwen_tokenizer.eos_token == "<|endoftext|>" and qwen_tokenizer.bos_token is None
    config = json.loads((qwen_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too


def test_the_llama3_style_tokenizer_adds_llama_3_s_special_tokens_after_qwen_s(
    qwen_tokenizer, llama3_tokenizer_dir
):
    from formats.tokenizer import load_tokenizer

    llama = load_tokenizer(llama3_tokenizer_dir)
    assert len(llama) == 151665 + len(LLAMA3_SPECIAL_TOKENS)
    for i, content in enumerate(LLAMA3_SPECIAL_TOKENS, start=151665):
        assert llama.convert_tokens_to_ids(content) == i and llama.added_tokens_decoder[i].special
    assert (llama.bos_token, llama.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert llama.pad_token is None
    qwen_text = "<|im_start|>user\nWhat is 17 + 25?<|im_end|>\n"
    plain = llama(qwen_text + "<|start_header_id|>", add_special_tokens=False).input_ids
    assert plain[:-1] == qwen_tokenizer(qwen_text, add_special_tokens=False).input_ids
    assert plain[-1] == 151667  # <|start_header_id|>
    assert llama(qwen_text + "<|start_header_id|>").input_ids == [151665, *plain]  # bos first, as Llama 3's


def test_random_texts_match_tiktoken(qwen_tokenizer, tiktoken_reference):
    enc, _ = tiktoken_reference
    rng = random.Random(0)
    texts = [_random_text(rng) for _ in range(3000)]
    ours = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, ids in zip(texts, ours, strict=True) if ids != _reference_ids(enc, t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[0]!r}"


def test_every_vocabulary_token_matches_tiktoken(qwen_tokenizer, tiktoken_reference):
    enc, ranks = tiktoken_reference
    texts = []
    for token in ranks:
        try:
            texts.append(token.decode("utf-8"))
        except UnicodeDecodeError:
            continue  # partial UTF-8 sequences are not text
    assert len(texts) > 100_000
    ours = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [t for t, ids in zip(texts, ours, strict=True) if ids != _reference_ids(enc, t)]
    assert not mismatches, f"{len(mismatches)} vocabulary tokens differ, e.g. {mismatches[:3]!r}"


def test_sample_corpus_matches_tiktoken_and_round_trips(qwen_tokenizer, tiktoken_reference, aligned_parquet):
    import pyarrow.parquet as pq

    enc, _ = tiktoken_reference
    rows = pq.read_table(aligned_parquet).to_pylist()
    texts = [turn["value"] for row in rows for turn in row["conversations"]]
    ours = qwen_tokenizer(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, ours, strict=True):
        assert ids == _reference_ids(enc, text)
        assert qwen_tokenizer.decode(ids) == unicodedata.normalize(
            "NFC", text
        )  # no added tokens in this text


@pytest.mark.slow
def test_the_fixture_command_lines_run_as_the_readme_lists_them(tmp_path, qwen_tokenizer_dir, capsys):
    """`python -m testing.tokenizer --help` explains itself, and `python -m testing.tiny_models DIR` writes
    a model directory with its tokenizer, as a real snapshot has (the demo copies its own one in)."""
    from transformers import AutoTokenizer

    from testing import tiny_models, tokenizer

    with pytest.raises(SystemExit) as info:
        tokenizer.main(["--help"])
    assert info.value.code == 0 and "--llama3" in capsys.readouterr().out
    copied = tiny_models.main(
        [str(tmp_path / "copied"), "--plain-init", "--tokenizer", str(qwen_tokenizer_dir)]
    )
    for name in tiny_models.TOKENIZER_FILES:
        assert (copied / name).read_bytes() == (qwen_tokenizer_dir / name).read_bytes()
    built = tiny_models.main([str(tmp_path / "built"), "--family", "qwen3"])
    assert json.loads((built / "config.json").read_text())["model_type"] == "qwen3"
    loaded = AutoTokenizer.from_pretrained(built)
    assert loaded.convert_tokens_to_ids("<|im_end|>") == 151645 and len(loaded) == 151665
