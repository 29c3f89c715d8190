#!/usr/bin/env python
"""Benchmark of tools/preprocess_sft.py; prints figures (not a test).

In one run, on a synthetic corpus of >= 100 MB of text whose conversation lengths follow a long-tailed
reasoning-trace distribution (log-normal, median ~3K tokens, tail past 32K):

1. raw tokenizer throughput: the same tokenizer's Rust batch encode of the same texts, all cores;
2. end to end: `tools/preprocess_sft.py --workers <cores>` as a subprocess (tokenise, spill, pack,
   write indexed files), tokens/s and peak RSS of its process tree; goal >= 0.8x (1); its write stage's
   bytes/s against a plain sequential write of as many bytes to the same directory (goal >= 0.5x),
   once as logged by the pipeline, and in alternating repeated trials of the write stage alone, each
   after a sync, so that both start from the same state of the disk (`--write-trials PREFIX` runs only
   these, on an existing output);
3. packing quality at 32K: best-fit decreasing vs LLaMA-Factory's per-1000-sample greedy knapsack on
   the corpus's lengths and on 2 million synthetic lengths (goals: >= 99.5% fill, strictly fewer packs);
4. packing time for 2 million lengths (goal < 10 s);
5. the same conversations read through a LLaMA-Factory registry (--dataset-info): as one sharegpt
   jsonl file, and as a mixture of two datasets (the first half sharegpt jsonl, the second half an
   alpaca json array), tokens/s and peak RSS beside the aligned-parquet path's;
6. with `--many-rows N` only: memory with many conversations, N short sharegpt rows split over two
   jsonl datasets of one registry, peak RSS of the run.

    .venv/bin/python bench/preprocess.py [--megabytes 100] [--workdir DIR] [--json OUT]
    .venv/bin/python bench/preprocess.py --many-rows 1000000 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from formats.chat_template import AM_THINKING  # noqa: E402
from formats.packed import PackedWriter  # noqa: E402
from preprocess.packing import best_fit_decreasing  # noqa: E402
from testing.llamafactory_packing import llamafactory_greedy_knapsack  # noqa: E402
from testing.sample_data import UNICODE_SNIPPETS, WORDS  # noqa: E402
from testing.synthetic_packs import read_sequence_lengths  # noqa: E402
from testing.template_text import render  # noqa: E402

from measure import run_with_peak_rss  # noqa: E402  (bench/measure.py)

SEQ = 32768


def synthetic_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """Tokens per conversation: log-normal, median 3,000, ~1% past 32K (then cut to the cutoff)."""
    return np.maximum(rng.lognormal(np.log(3000), 1.0, n), 64).astype(np.int64)


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """An aligned parquet of reasoning conversations; returns their rendered texts and the rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.array(
        WORDS + list(UNICODE_SNIPPETS[:3]) + [".", ",", "\n", "=", "(", ")", "2", "17"], dtype=object
    )
    rows, texts, size = [], [], 0
    while size < megabytes * 1_000_000:
        words = int(synthetic_lengths(1, rng)[0])
        question = " ".join(vocab[rng.integers(0, len(vocab), max(8, words // 20))])
        think = " ".join(vocab[rng.integers(0, len(vocab), words)])
        answer = f"<think>\n{think}\n</think> <answer>\n{think[:200]}\n</answer>"
        conv = [{"from": "human", "value": question}, {"from": "assistant", "value": answer}]
        rows.append({"conversations": conv, "system": "", "subset": "bench"})
        texts.append(render(AM_THINKING, None, [question, answer]))
        size += len(question) + len(answer)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=512)
    return texts, rows


def write_registry_corpus(rows: list[dict], folder: Path) -> Path:
    """The rows as registry datasets: `sharegpt` (all of them, jsonl), `first_half` (sharegpt jsonl) and
    `second_half` (alpaca json array); returns the dataset_info.json."""
    folder.mkdir(parents=True, exist_ok=True)
    half = len(rows) // 2
    jsonl = lambda part: "".join(json.dumps({"conversations": r["conversations"]}) + "\n" for r in part)  # noqa: E731
    (folder / "sharegpt.jsonl").write_text(jsonl(rows))
    (folder / "first_half.jsonl").write_text(jsonl(rows[:half]))
    alpaca = [
        {"instruction": r["conversations"][0]["value"], "output": r["conversations"][1]["value"]}
        for r in rows[half:]
    ]
    (folder / "second_half.json").write_text(json.dumps(alpaca))
    tags = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "assistant"}
    sharegpt = {"formatting": "sharegpt", "tags": tags}
    registry = {
        "sharegpt": {"file_name": "sharegpt.jsonl", **sharegpt},
        "first_half": {"file_name": "first_half.jsonl", **sharegpt},
        "second_half": {
            "file_name": "second_half.json",
            "columns": {"prompt": "instruction", "response": "output"},
        },
    }
    (folder / "dataset_info.json").write_text(json.dumps(registry))
    return folder / "dataset_info.json"


def many_rows_run(rows: int, work: Path, tokenizer_dir: Path, workers: int) -> dict:
    """N short conversations in two jsonl datasets of one registry, preprocessed as a mixture."""
    rng = np.random.default_rng(0)
    folder = work / "many"
    folder.mkdir(parents=True, exist_ok=True)
    for part, count in (("a", rows // 2), ("b", rows - rows // 2)):
        with open(folder / f"{part}.jsonl", "w") as f:
            for _ in range(count):
                question = " ".join(rng.choice(WORDS, 8))
                answer = "<think>" + " ".join(rng.choice(WORDS, 40)) + "</think> ok"
                conv = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
                f.write(json.dumps({"conversations": conv}) + "\n")
    entry = {"formatting": "sharegpt"}
    registry = {"a": {"file_name": "a.jsonl", **entry}, "b": {"file_name": "b.jsonl", **entry}}
    (folder / "dataset_info.json").write_text(json.dumps(registry))
    row = registry_run(folder / "dataset_info.json", "a,b", tokenizer_dir, work / "out" / "many", workers)
    meta = json.loads((work / "out" / "many_meta.json").read_text())
    return {**row, "rows": rows, "conversations": meta["stats"]["conversations"]}


def registry_run(registry: Path, datasets: str, tokenizer_dir: Path, prefix: Path, workers: int) -> dict:
    """tools/preprocess_sft.py --dataset-info as a subprocess: wall, tokens/s, peak RSS, stage times."""
    cmd = [sys.executable, "tools/preprocess_sft.py", "--dataset-info", str(registry), "--dataset", datasets]
    cmd += [
        "--tokenizer",
        str(tokenizer_dir),
        "--output-prefix",
        str(prefix),
        "--workers",
        str(workers),
        "--force",
    ]
    wall, peak_rss, peak_anon, output = run_with_peak_rss(cmd)
    tokens = json.loads(Path(f"{prefix}_meta.json").read_text())["stats"]["tokens"]
    return {
        "datasets": datasets,
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall),
        "wall_s": round(wall, 1),
        "peak_rss_mb": round(peak_rss / 2**20),
        "peak_rss_anon_mb": round(peak_anon / 2**20),
        "stage_seconds": stage_seconds(output),
    }


def raw_tokenizer_throughput(tokenizer_dir: Path, texts: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of the Rust tokenizer's batch encode over all cores, in a fresh process."""
    code = (
        "import sys, time, pyarrow.parquet as pq; from tokenizers import Tokenizer\n"
        "texts = pq.read_table(sys.argv[2]).column('text').to_pylist()\n"
        "tok = Tokenizer.from_file(sys.argv[1] + '/tokenizer.json')\n"
        "tok.encode_batch_fast(texts[:64], add_special_tokens=False)\n"
        "t = time.perf_counter(); n = 0\n"
        "for i in range(0, len(texts), 1024):\n"
        "    n += sum(len(e.ids) for e in tok.encode_batch_fast(texts[i:i + 1024], "
        "add_special_tokens=False))\n"
        "print(n, time.perf_counter() - t)\n"
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "texts.parquet"
        pq.write_table(pa.table({"text": texts}), text_file)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
        out = subprocess.run(
            [sys.executable, "-c", code, str(tokenizer_dir), str(text_file)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.split()
    return int(out[0]), float(out[1])


def stage_seconds(output: str) -> dict[str, float]:
    """The pipeline's own 'stage times: name S s, ...' log line, parsed."""
    line = next(line for line in output.splitlines() if "stage times:" in line)
    stages = line.split("stage times:", 1)[1].split(",")
    return {
        # "write 2753 train packs 7.8 s" -> "write"
        re.sub(r" \d+( \w+)+$", "", part.strip().rsplit(" ", 2)[0]): float(part.strip().rsplit(" ", 2)[1])
        for part in stages
    }


def plain_sequential_write(path: Path, nbytes: int, block: int = 1 << 20) -> float:
    """Seconds to write `nbytes` to `path` in `block`-byte writes from one buffer (1 MiB: the fastest
    block size measured here), without fsync, like the write stage (its files are synced at commit, a
    later stage); the file is removed afterwards."""
    data = memoryview(np.random.default_rng(0).integers(0, 256, size=block, dtype=np.uint8).tobytes())
    start = time.perf_counter()
    with open(path, "wb") as f:
        for offset in range(0, nbytes, block):
            f.write(data[: min(block, nbytes - offset)])  # a memoryview slice: no copy
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def write_stage_trials(prefix: Path, work: Path, workers: int, trials: int = 5) -> dict:
    """The write stage alone (`write_packs`) against a plain sequential write of as many bytes, in
    alternating trials, each after a sync, for a median under equal conditions (one timing of a
    sub-second stage varies from run to run on a shared machine). The pipeline's output serves as the
    spill: its conversations, packed again with another seed, are gathered in a new order. Run it in a
    fresh process (`--write-trials`), as the pipeline runs the stage."""
    from preprocess.write import write_packs

    work.mkdir(parents=True, exist_ok=True)
    spill = work / "trial_spill_ids", work / "trial_spill_mask"
    for suffix, path in (("_input_ids.bin", spill[0]), ("_loss_mask.bin", spill[1])):
        # written through the page cache, as the tokenise stage writes its spill
        np.fromfile(f"{prefix}{suffix}", dtype=np.uint8).tofile(path)
    lengths = read_sequence_lengths(f"{prefix}_input_ids.idx").astype(np.int64)
    plan = best_fit_decreasing(lengths, SEQ, seed=1).shuffled(1)
    nbytes = int(lengths.sum()) * 5
    stage_s, plain_s = [], []
    for _ in range(trials):
        os.sync()
        start = time.perf_counter()
        with PackedWriter(work / "trial" / "packs", SEQ) as writer:
            write_packs(plan, np.arange(len(lengths)), lengths, *spill, writer, workers)
            stage_s.append(time.perf_counter() - start)
        os.sync()
        plain_s.append(plain_sequential_write(work / "trial_plain.bin", nbytes))
    for path in spill:
        path.unlink()
    return {
        "trials": trials,
        "stage_mb_per_s": [round(nbytes / x / 1e6) for x in stage_s],
        "plain_mb_per_s": [round(nbytes / x / 1e6) for x in plain_s],
        "median_stage_vs_plain": round(float(np.median(plain_s) / np.median(stage_s)), 3),
    }


def packing_figures(lengths: np.ndarray) -> dict:
    lengths = np.minimum(lengths, SEQ - 1)
    t = time.perf_counter()
    plan = best_fit_decreasing(lengths, SEQ, seed=0)
    bfd_s = time.perf_counter() - t
    t = time.perf_counter()
    lf = llamafactory_greedy_knapsack(lengths, SEQ)
    lf_s = time.perf_counter() - t
    total = int(lengths.sum())
    return {
        "conversations": len(lengths),
        "best_fit_packs": plan.num_packs,
        "best_fit_fill": total / (plan.num_packs * SEQ),
        "best_fit_seconds": bfd_s,
        "llamafactory_packs": len(lf),
        "llamafactory_fill": total / (len(lf) * SEQ),
        "llamafactory_seconds": lf_s,
        "lower_bound_packs": -(-total // SEQ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megabytes", type=int, default=100, help="corpus size in MB of text (default 100)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to put the corpus and outputs (default: a temp dir)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--write-trials",
        type=Path,
        default=None,
        metavar="PREFIX",
        help="only the write-stage trials, on an existing output PREFIX of tools/preprocess_sft.py (its "
        "files serve as the spill), in --workdir; prints their figures as JSON. The full run runs them "
        "this way, in a fresh process like the pipeline's: forked writers are slower from a process that "
        "has loaded torch or run the tokenizer",
    )
    parser.add_argument(
        "--many-rows", type=int, default=None, metavar="N", help="only the many-conversations memory run"
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.many_rows:
        from testing.tokenizer import build_qwen25_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            work = args.workdir or Path(tmp)
            figures = many_rows_run(args.many_rows, work, build_qwen25_tokenizer(work / "tokenizer"), cores)
        print(
            f"{figures['conversations']:,} of {figures['rows']:,} short conversations in two registry "
            f"datasets: {figures['tokens']:,} tokens in {figures['wall_s']} s, peak RSS "
            f"{figures['peak_rss_mb']:,} MiB (anonymous {figures['peak_rss_anon_mb']:,} MiB)"
        )
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
        return 0
    if args.write_trials:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(write_stage_trials(args.write_trials, args.workdir or Path(tmp), cores)))
        return 0
    from testing.tokenizer import build_qwen25_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer_dir = work / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            build_qwen25_tokenizer(tokenizer_dir)
        corpus = work / "corpus.parquet"
        t = time.perf_counter()
        texts, rows = write_corpus(corpus, args.megabytes)
        registry = write_registry_corpus(rows, work / "registry")
        del rows
        text_mb = sum(len(x.encode()) for x in texts) / 1e6
        print(
            f"corpus: {len(texts):,} conversations, {text_mb:.0f} MB of text "
            f"({time.perf_counter() - t:.0f} s to make)"
        )

        raw_tokens, raw_s = raw_tokenizer_throughput(tokenizer_dir, texts)
        del texts
        prefix = work / "out" / "bench"
        cmd = [
            sys.executable,
            "tools/preprocess_sft.py",
            "--input",
            str(corpus),
            "--tokenizer",
            str(tokenizer_dir),
            "--output-prefix",
            str(prefix),
            "--workers",
            str(cores),
            "--force",
        ]
        wall, peak_rss, peak_anon, output = run_with_peak_rss(cmd)
        stages = stage_seconds(output)
        meta = json.loads(Path(f"{prefix}_meta.json").read_text())
        stats = meta["stats"]
        written = stats["tokens"] * 5  # int32 ids + uint8 mask
        plain_s = plain_sequential_write(work / "out" / "plain.bin", written)
        trials = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--write-trials", str(prefix), "--workdir", str(work)],
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            ).stdout
        )
        registry_rows = {
            name: registry_run(registry, datasets, tokenizer_dir, work / "out" / name, cores)
            for name, datasets in (("sharegpt_jsonl", "sharegpt"), ("mixture", "first_half,second_half"))
        }
        corpus_lengths = read_sequence_lengths(f"{prefix}_input_ids.idx").astype(np.int64)
        corpus_full = packing_figures(corpus_lengths)
        synthetic = packing_figures(synthetic_lengths(2_000_000, np.random.default_rng(1)))

    pipeline_tps = stats["tokens"] / wall
    raw_tps = raw_tokens / raw_s
    stage_tps = stats["tokens"] / stages["tokenise"]
    figures = {
        "machine": f"{platform.node()} {cores} cores, {platform.processor() or platform.machine()}",
        "corpus_mb": round(text_mb, 1),
        "conversations": stats["conversations"],
        "tokens": stats["tokens"],
        "raw_tokenizer_tokens_per_s": round(raw_tps),
        "pipeline_tokens_per_s": round(pipeline_tps),
        "pipeline_vs_raw": round(pipeline_tps / raw_tps, 3),
        "pipeline_wall_s": round(wall, 1),
        "tokenise_stage_tokens_per_s": round(stage_tps),
        "tokenise_stage_vs_raw": round(stage_tps / raw_tps, 3),
        "stage_seconds": stages,
        "write_stage_mb_per_s": round(written / stages["write"] / 1e6, 1),
        "plain_sequential_write_mb_per_s": round(written / plain_s / 1e6, 1),
        "write_stage_vs_plain_write": round(plain_s / stages["write"], 3),
        "write_stage_trials": trials,
        "pipeline_peak_rss_mb": round(peak_rss / 2**20),
        "pipeline_peak_rss_anon_mb": round(peak_anon / 2**20),
        "pipeline_packing_efficiency": stats["packing_efficiency"],
        "registry": registry_rows,
        "packing_corpus": corpus_full,
        "packing_2M": synthetic,
    }
    print(f"raw tokenizer (Rust batch encode, {cores} cores): {raw_tps:,.0f} tokens/s")
    print(
        f"preprocess_sft.py end to end (--workers {cores}): {pipeline_tps:,.0f} tokens/s "
        f"= {pipeline_tps / raw_tps:.2f}x raw (goal >= 0.8); {stats['tokens']:,} tokens in {wall:.1f} s; "
        f"peak RSS {peak_rss / 2**20:,.0f} MiB, of it anonymous {peak_anon / 2**20:,.0f} MiB (process tree)"
    )
    print(
        f"  of which the tokenise stage: {stage_tps:,.0f} tokens/s = {stage_tps / raw_tps:.2f}x raw; the "
        "rest is "
        f"start-up and fixed costs ({wall - stages['tokenise']:.1f} s: "
        + ", ".join(f"{k} {v} s" for k, v in stages.items() if k != "tokenise")
        + ", process start and imports)"
    )
    write_mb_s, plain_mb_s = written / stages["write"] / 1e6, written / plain_s / 1e6
    print(
        f"write stage: {written / 1e6:,.0f} MB in {stages['write']:.2f} s = {write_mb_s:,.0f} MB/s; a plain "
        f"sequential write of as many bytes to the same directory: {plain_mb_s:,.0f} MB/s -> "
        f"{plain_s / stages['write']:.2f}x (goal >= 0.5)"
    )
    print(
        f"write stage alone, {trials['trials']} alternating trials after a sync: "
        f"{', '.join(map(str, trials['stage_mb_per_s']))} MB/s; plain sequential write: "
        f"{', '.join(map(str, trials['plain_mb_per_s']))} MB/s -> median "
        f"{trials['median_stage_vs_plain']:.2f}x (goal >= 0.5)"
    )
    for name, row in registry_rows.items():
        print(
            f"registry {name} ({row['datasets']}): {row['tokens_per_s']:,} tokens/s "
            f"({row['tokens_per_s'] / pipeline_tps:.2f}x the aligned parquet's); {row['tokens']:,} tokens in "
            f"{row['wall_s']} s; peak RSS {row['peak_rss_mb']:,} MiB, anonymous "
            f"{row['peak_rss_anon_mb']:,} MiB"
        )
    for name, f in (("corpus lengths", corpus_full), ("2M synthetic lengths", synthetic)):
        print(
            f"packing at {SEQ} on {name} ({f['conversations']:,}): best-fit decreasing "
            f"{f['best_fit_packs']:,} packs, "
            f"fill {f['best_fit_fill']:.4%} ({f['best_fit_seconds']:.2f} s); LLaMA-Factory greedy "
            f"{f['llamafactory_packs']:,} packs, fill {f['llamafactory_fill']:.4%} "
            f"({f['llamafactory_seconds']:.2f} s); "
            f"lower bound {f['lower_bound_packs']:,}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
