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
import typing
from pathlib import Path

from common.cli import exit_status
from common.config_docs import field_docs
from common.logging_utils import setup_logging
from formats.chat_template import TEMPLATES
from formats.packed import validation_prefix
from preprocess.config import OVERLONG_CHOICES, SYSTEM_SOURCES, PreprocessConfig
from preprocess.meta import report
from preprocess.pipeline import preprocess

# A flag's default and its documentation are its PreprocessConfig field's (one place).
DEFAULTS = {
    f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
    for f in dataclasses.fields(PreprocessConfig)
    if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
}
DOCS = field_docs(PreprocessConfig)
# What a flag takes besides its field's type: its choices, or a boolean's form. A template's name is
# checked by formats.chat_template (aliases such as am-thinking pass), so its flag only lists them.
CHOICES = {"overlong": OVERLONG_CHOICES, "system_source": SYSTEM_SOURCES}
METAVARS = {"template": "{" + ",".join(TEMPLATES) + "}"}
SWITCHES = {"mask_history", "train_on_prompt", "force"}  # off by default: --NAME turns it on


def flag_help(name: str) -> str:
    """The field's documentation, and its default where it has one worth printing."""
    default = DEFAULTS.get(name)
    if name == "workers" or default is None or name in SWITCHES:  # a machine's, none, or off
        return DOCS[name]
    return f"{DOCS[name]} (default {default})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(PreprocessConfig)
    for f in dataclasses.fields(PreprocessConfig):
        flag, kind = "--" + f.name.replace("_", "-"), _flag_type(hints[f.name])
        if f.name in SWITCHES:
            parser.add_argument(flag, action="store_true", help=flag_help(f.name))
        elif kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=DEFAULTS[f.name], help=flag_help(f.name)
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                choices=CHOICES.get(f.name),
                default=DEFAULTS.get(f.name),
                required=f.name not in DEFAULTS,
                metavar=None if f.name in CHOICES else METAVARS.get(f.name, f.name.upper()),
                help=flag_help(f.name),
            )
    return parser


def _flag_type(hint) -> type:
    """The type a flag's value converts to: the field's, without `| None`."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args else hint


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
