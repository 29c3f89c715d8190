#!/usr/bin/env python
"""Benchmark scores of a model directory (a release of this project, a base model, anyone's checkpoint
with a chat template), as K2-Think reports them: pass@1 over several samples per problem.

    python tools/evaluate.py --model release/K2-Think-SFT --data eval-data \\
        --benchmarks aime24,aime25,hmmt25,math500,gpqa_diamond --profile k2think --output out/eval

--data is a directory with one file per benchmark, NAME.jsonl or NAME.parquet, with the hub dataset's
own columns (`problem`, `answer`; GPQA's `Question`, `Correct Answer`, `Incorrect Answer 1..3`). The
profile (configs/eval/: k2think, am) sets sampling, the token cap, samples per problem, stop strings and
the user-turn suffix; the flags below override it. Prompts go through the model's own chat template;
without --system-prompt its default system prompt applies (for a release of this project, the one it
was trained with). lm-evaluation-harness runs the generation: `--backend hf` (transformers, anywhere)
or `--backend vllm` (on GPUs, from the environment of requirements/eval-gpu.txt; slurm/eval.sh); each
reply is graded here (evaluation/grading.py: the answer after the thinking, math-verify). A prompt that
would not fit the model's context together with --max-new-tokens is refused before any weights load.

Writes OUTPUT/results.json (per benchmark: pass@1, its standard error over problems, problems, samples,
share of replies at the token cap, mean reply tokens; the settings, the model's and data's fingerprints,
versions), OUTPUT/samples/NAME.jsonl (every reply: prompt, reply, extracted answer, gold, correct,
tokens, finish reason), OUTPUT/results.md and OUTPUT/results.png (the scores beside the figures the
references report, evaluation/references.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from common.cli import exit_status
from common.errors import InputError
from common.files import file_fingerprint
from common.logging_utils import setup_logging
from common.provenance import tool_info
from evaluation.benchmarks import BENCHMARKS, benchmark_file, benchmarks_in, read_benchmark
from evaluation.harness import longest_prompt, markdown_table, run_benchmarks, write_outputs
from evaluation.settings import load_profile, profile_names

log = logging.getLogger("evaluate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, required=True, help="HF model directory with a chat template")
    parser.add_argument(
        "--data", type=Path, required=True, help="directory of NAME.jsonl / NAME.parquet files"
    )
    parser.add_argument(
        "--benchmarks",
        help=f"comma-separated, from: {', '.join(BENCHMARKS)} (default: every one with a file in --data)",
    )
    parser.add_argument(
        "--profile",
        default="k2think",
        help=f"settings: {', '.join(profile_names())} (configs/eval/NAME.yaml; default k2think) "
        "or a YAML file of the same keys",
    )
    parser.add_argument("--samples", type=int, help="replies per problem (pass@1 is their mean)")
    parser.add_argument("--max-new-tokens", type=int, help="the token cap of one reply")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling's probability mass")
    parser.add_argument(
        "--limit", type=int, help="the first N problems of each benchmark only (a smoke test)"
    )
    parser.add_argument(
        "--seed", type=int, help="seed of the sampling and of GPQA's option order (default 0)"
    )
    parser.add_argument(
        "--system-prompt", help="the system turn (default: the chat template's own, e.g. the trained one)"
    )
    parser.add_argument(
        "--backend",
        choices=["hf", "vllm"],
        default="hf",
        help="generation through transformers (hf, default) or vLLM (its own environment: "
        "requirements/eval-gpu.txt)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="hf: default cuda when available")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="hf: prompts generated together (default 8)"
    )
    parser.add_argument(
        "--tensor-parallel", type=int, default=1, help="vllm: GPUs per model copy (default 1)"
    )
    parser.add_argument("--data-parallel", type=int, default=1, help="vllm: model copies (default 1)")
    parser.add_argument("--output", type=Path, required=True, help="the directory to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    return parser


def chosen_benchmarks(data: Path, names: str | None) -> list[str]:
    if names:
        return [n.strip() for n in names.split(",") if n.strip()]
    present = benchmarks_in(data)
    if not present:
        benchmark_file(data, "aime24")  # names the missing directory, if that is the problem
        raise InputError(
            f"{data} holds no benchmark file (NAME.jsonl or NAME.parquet; NAME: {', '.join(BENCHMARKS)})"
        )
    return present


def load_model_tokenizer(model: Path):
    """The model directory's tokenizer, which must carry a chat template."""
    from transformers import AutoTokenizer

    if not (model / "config.json").is_file():
        raise InputError(f"{model}: no config.json; --model takes a Hugging Face model directory")
    tokenizer = AutoTokenizer.from_pretrained(model)
    if not tokenizer.chat_template:
        raise InputError(
            f"{model}: the tokenizer has no chat template; a release of this project carries one "
            "(tools/convert_mcore_to_hf.py), or add the model's own"
        )
    return tokenizer


def context_length(model: Path) -> int:
    """The model's context in tokens (config.json's max_position_embeddings)."""
    import json

    config = json.loads((model / "config.json").read_text())
    context = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    if not context:
        raise InputError(
            f"{model / 'config.json'}: no max_position_embeddings, the context to check prompts against"
        )
    return int(context)


def check_context(prompt_tokens: int, max_new_tokens: int, context: int, model: Path) -> None:
    """Both engines cut a prompt that leaves less than the token cap free: refuse that instead."""
    if prompt_tokens + max_new_tokens > context:
        raise InputError(
            f"the longest prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} need "
            f"{prompt_tokens + max_new_tokens} tokens, over {model}'s context of {context} "
            "(config.json max_position_embeddings): lower --max-new-tokens, or the prompt would be cut"
        )


def model_fingerprint(model: Path) -> dict:
    files = sorted([model / "config.json", *model.glob("*.safetensors")])
    return {"path": str(model.resolve()), "files": [file_fingerprint(f) for f in files]}


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)

    def body() -> int:
        settings = (
            load_profile(args.profile)
            .with_overrides(
                samples=args.samples,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                limit=args.limit,
                seed=args.seed,
                system_prompt=args.system_prompt,
            )
            .validated()
        )
        if args.output.exists() and not args.force:
            raise InputError(f"{args.output} already exists; pass --force to replace it")
        names = chosen_benchmarks(args.data, args.benchmarks)
        problems = {name: read_benchmark(args.data, name, settings.seed) for name in names}
        tokenizer = load_model_tokenizer(args.model)
        prompt_tokens, context = longest_prompt(tokenizer, problems, settings), context_length(args.model)
        check_context(prompt_tokens, settings.max_new_tokens, context, args.model)
        if args.backend == "vllm":
            needed = prompt_tokens + settings.max_new_tokens
            lm = _vllm_model(args.model, args.tensor_parallel, args.data_parallel, needed, settings.seed)
        else:
            lm = _hf_model(args.model, args.device, args.batch_size)
        evaluation = run_benchmarks(
            lm, problems, settings, lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
        )
        for name, replies in evaluation.replies.items():
            log.info("%s, the first prompt as rendered:\n%s", name, replies[0].prompt)
        about = {
            "model": model_fingerprint(args.model),
            "data": {name: file_fingerprint(benchmark_file(args.data, name)) for name in names},
            "backend": args.backend,
            "longest_prompt_tokens": prompt_tokens,
            "context_tokens": context,
            "provenance": tool_info("evaluate"),
        }
        write_outputs(evaluation, args.output, about, force=args.force)
        print(markdown_table(evaluation.scores), end="")
        print(f"wrote {args.output}/results.json, results.md and samples/")
        return 0

    return exit_status(body)


def _hf_model(model: Path, device: str | None, batch_size: int):
    import torch
    from lm_eval.models.huggingface import HFLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "float32" if device == "cpu" else "auto"
    return HFLM(pretrained=str(model), device=device, dtype=dtype, batch_size=batch_size)


def _vllm_model(model: Path, tensor_parallel: int, data_parallel: int, max_model_len: int, seed: int):
    """vLLM through lm-eval, its context exactly the longest prompt plus the token cap (no more KV cache
    than needed, and no prompt cut)."""
    from importlib.util import find_spec

    if find_spec("vllm") is None:
        raise InputError(
            "--backend vllm needs vLLM, which pins its own torch and lives in its own environment: build it "
            "from requirements/eval-gpu.txt (its header says how) and run this tool with that Python"
        )
    from lm_eval.models.vllm_causallms import VLLM

    return VLLM(
        pretrained=str(model),
        dtype="auto",
        tensor_parallel_size=tensor_parallel,
        data_parallel_size=data_parallel,
        max_model_len=max_model_len,
        seed=seed,
        batch_size="auto",
    )


if __name__ == "__main__":
    sys.exit(main())
