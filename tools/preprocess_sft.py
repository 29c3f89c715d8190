#!/usr/bin/env python
"""Tokenises conversations with a chat template and packs them for megatron-core.

The recipe's data (the aligned parquet of tools/get_am_dataset.py, the AM-thinking template):

    python tools/preprocess_sft.py --input data/AM-Thinking-3697c18.parquet \\
        --tokenizer /path/to/Qwen2.5-32B --output-prefix data/am_thinking_32k

Any datasets a LLaMA-Factory registry (dataset_info.json) describes, concatenated, with a template
by name:

    python tools/preprocess_sft.py --dataset-info data/dataset_info.json --dataset openthoughts,my_tools \\
        --template qwen --tokenizer /path/to/Qwen2.5-32B --output-prefix data/mix_32k

Writes PREFIX_input_ids.{bin,idx} (int32 token ids), PREFIX_loss_mask.{bin,idx} (uint8, 1 = trained),
PREFIX_lengths.png (length histogram) and, last, PREFIX_meta.json (settings, statistics, tokenizer and
input fingerprints, counts per dataset, this command line). One Megatron document is one packed
sequence of at most --seq-length tokens; each sequence inside it is one conversation. Token ids and
loss masks match LLaMA-Factory 0.9.3's for the same data, template and cutoff (seq_length - 1),
truncation included.
With --valid-fraction F, about F of the conversations are held out as a validation set, written the
same way under the prefix PREFIX_valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from common.cli import exit_status  # noqa: E402
from common.logging_utils import setup_logging  # noqa: E402
from formats.chat_template import TEMPLATES  # noqa: E402
from formats.packed import validation_prefix  # noqa: E402
from preprocess.config import OVERLONG_CHOICES, SYSTEM_SOURCES, PreprocessConfig  # noqa: E402
from preprocess.meta import report  # noqa: E402
from preprocess.pipeline import preprocess  # noqa: E402

# The defaults are PreprocessConfig's (one place): the flags only name them.
DEFAULTS = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(PreprocessConfig)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input",
        type=Path,
        help="aligned parquet from tools/get_am_dataset.py (columns conversations, system, subset); "
        "or give --dataset-info and --dataset instead",
    )
    parser.add_argument(
        "--dataset-info",
        type=Path,
        help="a LLaMA-Factory dataset registry: dataset_info.json, or the folder holding it (file_name "
        "paths are relative to its folder)",
    )
    parser.add_argument(
        "--dataset",
        help="NAME[,NAME...]: the registry's datasets to read, concatenated in this order and packed "
        "together (counts per dataset go in PREFIX_meta.json)",
    )
    parser.add_argument(
        "--template",
        default=DEFAULTS["template"],
        help=f"chat template, by LLaMA-Factory's name: {', '.join(TEMPLATES)} (default %(default)s, the "
        "recipe's; am-thinking also works); its stop token must be in the tokenizer",
    )
    parser.add_argument(
        "--mask-history",
        action="store_true",
        help="train on the last assistant turn only (LLaMA-Factory's mask_history; truncation then "
        "keeps the last turns); default: every assistant turn, as the recipe",
    )
    parser.add_argument(
        "--train-on-prompt",
        action="store_true",
        help="train on the prompts too (LLaMA-Factory's train_on_prompt); not with --mask-history",
    )
    parser.add_argument(
        "--enable-thinking",
        action=argparse.BooleanOptionalAction,
        default=DEFAULTS["enable_thinking"],
        help="reasoning templates (qwen3): with it (default, LLaMA-Factory's), an answer without a "
        "<think> block gets an empty one, trained; without it, every answer's thoughts are removed and "
        "the empty block goes untrained into the prompt",
    )
    parser.add_argument(
        "--tool-date",
        help="the date the llama3 template's tool prompt names, e.g. '26 Jul 2024' (default: today, as "
        "LLaMA-Factory writes it); recorded in PREFIX_meta.json",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="local Hugging Face tokenizer directory (the base model's, e.g. Qwen2.5-32B)",
    )
    parser.add_argument(
        "--output-prefix",
        type=Path,
        required=True,
        help="path prefix P of the outputs P_input_ids.*, P_loss_mask.*, P_meta.json",
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=DEFAULTS["seq_length"],
        help="tokens per packed sequence (default %(default)s, the recipe's); each conversation is cut "
        "to seq_length - 1 tokens, as LLaMA-Factory does when packing",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=DEFAULTS["workers"],
        help="tokeniser processes (default: all cores); the output is identical for any value",
    )
    parser.add_argument(
        "--overlong",
        choices=OVERLONG_CHOICES,
        default=DEFAULTS["overlong"],
        help="conversations longer than the cutoff: 'truncate' with the recipe's per-turn rule "
        "(default) or 'drop' them; either way they are counted",
    )
    parser.add_argument(
        "--system-source",
        choices=SYSTEM_SOURCES,
        default=DEFAULTS["system_source"],
        help="--input only: where a sample's system text comes from: 'turn' (default, the recipe) = a "
        "leading turn with from == 'system', else the template's default prompt; 'column' = the "
        "aligned `system` column, else the default prompt (a deviation from the recipe)",
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=DEFAULTS["max_samples"],
        help="of each dataset, only the first N rows (after a registry entry's num_samples draw), as "
        "LLaMA-Factory's max_samples: for quick runs; default all",
    )
    parser.add_argument(
        "--pad-multiple",
        type=int,
        default=DEFAULTS["pad_multiple"],
        help="pack conversations as if each were rounded up to a multiple of N tokens "
        "(default %(default)s), so that every pack still fits --seq-length when the trainer pads each "
        "conversation for context "
        "parallelism (to 2 x CP, x TP with sequence parallelism; 64 serves every layout up to that); "
        "recorded in PREFIX_meta.json; 1 packs the real lengths, as LLaMA-Factory does",
    )
    parser.add_argument(
        "--valid-fraction",
        type=float,
        default=DEFAULTS["valid_fraction"],
        help="hold out about this fraction of the conversations (default %(default)s: none) as a "
        "validation set, written as the dataset PREFIX_valid (the trainer evaluates on it); "
        "a conversation's side is "
        "decided by a seeded hash of its content, so it stays held out when the dataset grows or is "
        "reordered",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="seed for tie-breaking among equal lengths, the order of packs, the held-out split and the "
        "registry's num_samples draws (LLaMA-Factory's training seed gives its draws; default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs of this prefix")
    return parser


def parse_args(argv=None) -> PreprocessConfig:
    return PreprocessConfig(**vars(build_parser().parse_args(argv)))


def main(argv=None) -> int:
    setup_logging()
    cfg = parse_args(argv)

    def body() -> int:
        meta = preprocess(cfg, command=[Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)])
        print(report(meta))
        print(f"wrote {cfg.output_prefix}_{{input_ids,loss_mask}}.{{bin,idx}}, _lengths.png, _meta.json")
        if meta["split"].get("valid_prefix"):
            print(f"and the held-out set {validation_prefix(cfg.output_prefix)}_* (the same files)")
        return 0

    return exit_status(body)


if __name__ == "__main__":
    sys.exit(main())
