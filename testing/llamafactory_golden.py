"""Golden encodings from LLaMA-Factory 0.9.3 itself, for the registry datasets of tests/data/llamafactory.

Each case is a template with loss options; LLaMA-Factory's own `get_dataset` reads the same
dataset_info.json (all its datasets, concatenated) with the same offline tokenizer, and every example it
keeps is written as one JSON line [input_ids, loss mask] after a header line that records how the
file was made. The training seed (SEED, given to our preprocessor as --seed) is set as
LLaMA-Factory's argument parser sets it, since num_samples draws from it.
tests/test_llamafactory_parity.py checks our preprocessor against these files.

LLaMA-Factory pins transformers 4.52, so it runs in its own environment:

    python3.11 -m venv /tmp/lf && /tmp/lf/bin/pip install "llamafactory==0.9.3" "torch==2.13.0" "pyarrow<21"
    .venv/bin/python -m testing.llamafactory_golden --lf-python /tmp/lf/bin/python

This file runs on both sides: in the LLaMA-Factory environment (`--dump`, stdlib and LLaMA-Factory
imports only) and in ours (building the tokenizers, writing the golden files).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "tests" / "data" / "llamafactory"
GOLDEN_DIR = DATA_DIR / "golden"
DATASETS = (
    "alpaca_history",
    "sharegpt_tools",
    "openai_messages",
    "reasoning",
    "reasoning_subset",
    "reasoning_repeated",
)
SEQ_LENGTH = 512  # packed length; LLaMA-Factory's per-example cutoff is one less when packing
SEED = 1234  # LLaMA-Factory's training seed, which num_samples draws from; our --seed
# case -> (template, tokenizer kind, LLaMA-Factory data arguments)
CASES = {
    "am_thinking": ("AM-thinking", "qwen", {}),
    "qwen": ("qwen", "qwen", {}),
    "qwen_mask_history": ("qwen", "qwen", {"mask_history": True}),
    "qwen_train_on_prompt": ("qwen", "qwen", {"train_on_prompt": True}),
    "qwen_max_samples": ("qwen", "qwen", {"max_samples": 3}),
    "qwen3": ("qwen3", "qwen", {}),
    "qwen3_no_thinking": ("qwen3", "qwen", {"enable_thinking": False}),
    "llama3": ("llama3", "llama3", {}),
}


def golden_path(case: str) -> Path:
    return GOLDEN_DIR / f"{case}.jsonl"


def read_golden(case: str) -> tuple[dict, list[tuple[list[int], list[int]]]]:
    """(the header, [(ids, mask) tuples per kept example, in LLaMA-Factory's order])."""
    lines = golden_path(case).read_text().splitlines()
    return json.loads(lines[0]), [tuple(map(tuple, json.loads(line))) for line in lines[1:]]


def register_am_thinking() -> None:
    """The recipe's AM-thinking template in LLaMA-Factory, with Qwen's tool formatters (the recipe's
    registration leaves tools unset; its slots are Qwen's, so Qwen's tool format is the one a Qwen model
    reads)."""
    from llamafactory.data.formatter import FunctionFormatter, StringFormatter, ToolFormatter
    from llamafactory.data.template import TEMPLATES, register_template

    qwen = TEMPLATES["qwen"]
    register_template(
        name="AM-thinking",
        format_user=StringFormatter(
            slots=["<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n"]
        ),
        format_assistant=StringFormatter(slots=["{{content}}<|im_end|>\n"]),
        format_system=StringFormatter(slots=["<|im_start|>system\n{{content}}<|im_end|>\n"]),
        format_function=FunctionFormatter(slots=["{{content}}<|im_end|>\n"], tool_format="qwen"),
        format_observation=qwen.format_observation,
        format_tools=ToolFormatter(tool_format="qwen"),
        default_system=(
            "You are a helpful assistant. To answer the user's question, you first think about the "
            "reasoning process and then provide the user with the answer. The reasoning process and answer "
            "are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> "
            "reasoning process here </think> <answer> answer here </answer>."
        ),
        stop_words=["<|im_end|>"],
        replace_eos=True,
    )


def dump(case: str, tokenizer_dir: str, out: str) -> None:
    """Runs inside the LLaMA-Factory environment: its get_dataset on the registry, one line per example."""
    import datetime

    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import DataArguments, ModelArguments
    from transformers import AutoTokenizer, Seq2SeqTrainingArguments, set_seed

    template_name, _, options = CASES[case]
    register_am_thinking()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with tempfile.TemporaryDirectory() as tmp:
        data_args = DataArguments(
            dataset_dir=str(DATA_DIR),
            dataset=",".join(DATASETS),
            template=template_name,
            cutoff_len=SEQ_LENGTH - 1,  # what packing=True makes of cutoff_len=SEQ_LENGTH, without packing
            overwrite_cache=True,
            **options,
        )
        model_args = ModelArguments(model_name_or_path=tokenizer_dir, cache_dir=tmp)
        training_args = Seq2SeqTrainingArguments(output_dir=tmp, do_train=True, seed=SEED, report_to="none")
        set_seed(training_args.seed)  # as LLaMA-Factory's get_train_args does: num_samples draws from it
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        dataset = get_dataset(
            template, model_args, data_args, training_args, stage="sft", tokenizer=tokenizer
        )
        examples = dataset["train_dataset"]
        header = {
            "case": case,
            "template": template_name,
            "options": options,
            "datasets": list(DATASETS),
            "seq_length": SEQ_LENGTH,
            "cutoff_len": data_args.cutoff_len,
            "tool_date": datetime.datetime.now().strftime("%d %b %Y"),  # what llama3's tool prompt wrote
            "made_by": "llamafactory 0.9.3 get_dataset (testing/llamafactory_golden.py)",
        }
        with open(out, "w") as f:
            f.write(json.dumps(header) + "\n")
            for example in examples:
                mask = [int(label != -100) for label in example["labels"]]
                f.write(json.dumps([example["input_ids"], mask]) + "\n")


def regenerate(lf_python: str) -> None:
    """Builds the offline tokenizers, runs every case in the LLaMA-Factory environment, writes the files."""
    sys.path.insert(0, str(ROOT))
    from formats.tokenizer import tokenizer_fingerprint
    from testing.tokenizer import build_llama3_style_tokenizer, build_qwen25_tokenizer

    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizers = {
            "qwen": build_qwen25_tokenizer(Path(tmp) / "qwen"),
            "llama3": build_llama3_style_tokenizer(Path(tmp) / "llama3"),
        }
        for case, (_, kind, _) in CASES.items():
            out = Path(tmp) / f"{case}.jsonl"
            done = subprocess.run(
                [lf_python, __file__, "--dump", case, str(tokenizers[kind]), str(out)],
                capture_output=True,
                text=True,
                env={"HF_DATASETS_CACHE": str(Path(tmp) / "hf_datasets"), "PATH": "/usr/bin:/bin"},
            )
            if done.returncode:
                raise SystemExit(f"{case}: LLaMA-Factory failed:\n{done.stderr[-4000:]}")
            header, *rows = out.read_text().splitlines()
            header = {
                **json.loads(header),
                "tokenizer": kind,
                "tokenizer_sha256": tokenizer_fingerprint(tokenizers[kind]),
            }
            golden_path(case).write_text(json.dumps(header) + "\n" + "".join(row + "\n" for row in rows))
            print(f"{case}: {len(rows)} examples -> {golden_path(case).relative_to(ROOT)}")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--dump":
        dump(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lf-python", required=True, help="python of an environment with llamafactory==0.9.3"
    )
    regenerate(parser.parse_args().lf_python)


if __name__ == "__main__":
    main()
