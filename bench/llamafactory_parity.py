#!/usr/bin/env python
"""Token-for-token parity of tools/preprocess_sft.py with LLaMA-Factory 0.9.3 (prints figures).

LLaMA-Factory 0.9.3 pins transformers 4.52 / tokenizers 0.21, so it runs in its own environment and
is not part of the test suite. This script runs LLaMA-Factory's own code there — the ShareGPT
converter with the recipe's dataset entry (only `conversations` mapped; tags from/value/human/
assistant/system), `SupervisedDatasetProcessor._encode_data_example` with the AM-thinking template
registered as the recipe does, `DataArguments(cutoff_len=seq_length, packing=True)` so that
LLaMA-Factory derives its own per-sample cutoff — on the bundled sample, and compares each
conversation's ids and loss mask (labels != -100) with what our pipeline wrote.

    python3.11 -m venv /tmp/lf && /tmp/lf/bin/pip install "llamafactory==0.9.3" "torch==2.13.0" "pyarrow<21"
    .venv/bin/python bench/llamafactory_parity.py --lf-python /tmp/lf/bin/python [--seq-length 32768 2048]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def register_am_thinking() -> None:
    """Runs inside the LLaMA-Factory environment: registers the recipe's AM-thinking template, as the
    recipe's README has it added to LLaMA-Factory's template.py."""
    from llamafactory.data.formatter import StringFormatter
    from llamafactory.data.template import register_template

    register_template(  # the recipe's registration, from its README and template slots
        name="AM-thinking",
        format_user=StringFormatter(
            slots=["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"]
        ),
        format_assistant=StringFormatter(slots=["{{content}}<|im_end|>\n"]),
        format_system=StringFormatter(slots=["<|im_start|>system\n{{content}}<|im_end|>\n"]),
        default_system=(
            "You are a helpful assistant. To answer the user's question, you first think about the reasoning "
            "process and then provide the user with the answer. The reasoning process and answer are "
            "enclosed "
            "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
            "process "
            "here </think> <answer> answer here </answer>."
        ),
        stop_words=["<|im_end|>"],
        replace_eos=True,
    )


def dump_llamafactory(aligned: str, tokenizer_dir: str, seq_length: int, out: str) -> None:
    """Runs inside the LLaMA-Factory environment: one JSON line [ids, mask] per kept conversation."""
    import pyarrow.parquet as pq
    from llamafactory.data.converter import SharegptDatasetConverter
    from llamafactory.data.parser import DatasetAttr
    from llamafactory.data.processor.supervised import SupervisedDatasetProcessor
    from llamafactory.data.template import get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments
    from transformers import AutoTokenizer

    register_am_thinking()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    data_args = DataArguments(template="AM-thinking", cutoff_len=seq_length, packing=True, neat_packing=True)
    template = get_template_and_fix_tokenizer(tokenizer, data_args)
    attr = DatasetAttr("file", dataset_name="AM-Thinking", formatting="sharegpt")
    attr.assistant_tag = "assistant"
    converter = SharegptDatasetConverter(attr, data_args)
    processor = SupervisedDatasetProcessor(
        template=template, tokenizer=tokenizer, processor=None, data_args=data_args
    )
    with open(out, "w") as f:
        for row in pq.read_table(aligned).to_pylist():
            example = converter({"conversations": row["conversations"]})
            prompt, response = example["_prompt"], example["_response"]
            if len(prompt) % 2 != 1 or len(response) != 1:
                continue  # LLaMA-Factory drops it too ("Dropped invalid example")
            ids, labels = processor._encode_data_example(
                prompt, response, example["_system"], example["_tools"], [], [], []
            )
            f.write(json.dumps([ids, [int(label != -100) for label in labels], data_args.cutoff_len]) + "\n")


def compare(lf_python: str, seq_lengths: list[int]) -> int:
    sys.path.insert(0, str(ROOT))
    from formats.packed import indexed_dataset_module
    from preprocess.align import align_snapshot
    from preprocess.config import PreprocessConfig
    from preprocess.pipeline import preprocess
    from testing.sample_data import write_sample_snapshot
    from testing.tokenizer import build_qwen25_tokenizer

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tokenizer_dir = build_qwen25_tokenizer(tmp / "tokenizer")
        aligned = tmp / "aligned.parquet"
        align_snapshot(write_sample_snapshot(tmp / "snapshot").root, aligned)
        for seq in seq_lengths:
            lf_out = tmp / f"lf_{seq}.jsonl"
            subprocess.run(
                [lf_python, __file__, "--dump", str(aligned), str(tokenizer_dir), str(seq), str(lf_out)],
                check=True,
                capture_output=True,
                text=True,
            )
            lf_rows = [json.loads(line) for line in lf_out.read_text().splitlines()]
            theirs = Counter((tuple(ids), tuple(mask)) for ids, mask, _ in lf_rows)

            prefix = tmp / f"ours_{seq}"
            meta = preprocess(
                PreprocessConfig(
                    input=aligned, tokenizer=tokenizer_dir, output_prefix=prefix, seq_length=seq, workers=2
                )
            )
            dataset_module = indexed_dataset_module()
            ids_ds = dataset_module.IndexedDataset(f"{prefix}_input_ids")
            mask_ds = dataset_module.IndexedDataset(f"{prefix}_loss_mask")
            ours = Counter(
                (tuple(ids_ds[i].tolist()), tuple(mask_ds[i].tolist())) for i in range(len(ids_ds))
            )
            del ids_ds, mask_ds

            same = sum((ours & theirs).values())
            truncated = sum(1 for ids, _, cutoff in lf_rows if len(ids) == cutoff)
            ok = ours == theirs
            failures += not ok
            print(
                f"seq_length {seq} (LLaMA-Factory cutoff {lf_rows[0][2]}, ours {meta['cutoff_len']}): "
                f"{same}/{len(lf_rows)} conversations identical in ids and loss mask "
                f"({meta['stats']['truncated']} truncated by us, {truncated} at the cutoff in LLaMA-Factory; "
                f"{meta['stats']['tokens']:,} tokens) -> {'PASS' if ok else 'FAIL'}"
            )
    return 1 if failures else 0


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--dump":
        dump_llamafactory(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lf-python", required=True, help="python of an environment with llamafactory==0.9.3"
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        nargs="+",
        default=[32768, 2048],
        help="packed lengths to compare at (default 32768, the recipe's, and 2048 for more truncation)",
    )
    args = parser.parse_args()
    return compare(args.lf_python, args.seq_length)


if __name__ == "__main__":
    sys.exit(main())
