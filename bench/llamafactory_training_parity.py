#!/usr/bin/env python
"""Training parity with LLaMA-Factory 0.9.3 at the recipe's layouts (prints figures; not a test).

LLaMA-Factory trains a tiny random Qwen2 (the real Qwen2.5 vocabulary) on the bundled sample, encoded
and packed by its own code (the recipe's AM-thinking template, `packing` + `neat_packing`, cutoff 512),
for a few steps on the CPU in fp32: one process, micro-batch 1, gradient accumulation 4, AdamW, cosine
schedule, clipping 1.0, the pack order unshuffled. Its packs, exactly as it trained on them, are
written into our packed format in the order our trainer visits them, and `pretrain_sft.py`'s trainer
trains the same initial weights on them at each layout (one process, TP2 x PP2, TP2+SP x CP2, and
TP2+SP x CP2 x PP2, the recipe's shape). Compared: the per-step losses (LLaMA-Factory logs them rounded
to 4 decimals) and every weight after the last step (LLaMA-Factory's saved model converted with our
converter, whose round trip is bitwise), against a bound of 2% of one Adam step (WEIGHT_BOUND).

LLaMA-Factory pins transformers 4.52, so it runs in its own environment:

    python3.11 -m venv /tmp/lf && /tmp/lf/bin/pip install "llamafactory==0.9.3" "torch==2.13.0" "pyarrow<21"
    .venv/bin/python bench/llamafactory_training_parity.py --lf-python /tmp/lf/bin/python \\
        [--json bench/results/llamafactory_training_parity.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEPS, GLOBAL_BATCH, CUTOFF, LR, SEED = 3, 4, 512, 1e-3, 1234
PAD_MULTIPLE = 8  # 2 x CP x TP of the largest layout below
# Adam moves an entry whose gradient is ~eps by up to a full step either way on summation-order noise:
# the trainer's own layouts are held to 1% of one step against its one process (tests/test_trainer.py);
# two frameworks' kernels, to 2%. A real difference shows as whole steps (a wrong rotary base: 200%).
WEIGHT_BOUND = LR * 2e-2
LAYOUTS = {  # name: (processes, overrides)
    "one process": (1, []),
    "TP2 x PP2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "TP2+SP x CP2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.context=2"]),
    "TP2+SP x CP2 x PP2": (
        8,
        ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.context=2", "parallel.pipeline=2"],
    ),
}


# LLaMA-Factory's side (its own environment) ------------------------------------------------------------


def train_llamafactory(model: str, dataset_dir: str, out: str, steps: str) -> None:
    """Runs inside the LLaMA-Factory environment: LLaMA-Factory's own `run_exp`, recording the packs of
    its training set in the order its sampler gives them (OUT/packs.jsonl); the model lands in OUT."""
    steps = int(steps)
    sys.path.insert(0, str(Path(__file__).parent))
    from llamafactory.train.tuner import run_exp
    from llamafactory_parity import register_am_thinking
    from transformers import TrainerCallback

    class RecordPacks(TrainerCallback):
        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            dataset = train_dataloader.dataset
            order = list(train_dataloader.base_dataloader.sampler)
            with open(Path(out) / "packs.jsonl", "w") as f:
                for index in order[: steps * GLOBAL_BATCH]:
                    row = dataset[index]
                    f.write(json.dumps({k: row[k] for k in ("input_ids", "attention_mask", "labels")}) + "\n")

    register_am_thinking()
    run_exp(
        {
            "stage": "sft",
            "do_train": True,
            "model_name_or_path": model,
            "finetuning_type": "full",
            "dataset": "am_sample",
            "dataset_dir": dataset_dir,
            "template": "AM-thinking",
            "cutoff_len": CUTOFF,
            "packing": True,
            "neat_packing": True,
            "overwrite_cache": True,
            "output_dir": out,
            "overwrite_output_dir": True,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": GLOBAL_BATCH,
            "learning_rate": LR,
            "max_steps": steps,
            "lr_scheduler_type": "cosine",
            "warmup_ratio": 0.0,
            "max_grad_norm": 1.0,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            "bf16": False,
            "flash_attn": "sdpa",
            "disable_shuffling": True,
            "seed": SEED,
            "dataloader_num_workers": 0,
        },
        callbacks=[RecordPacks()],
    )


# Our side ------------------------------------------------------------------------------------------------


def prepare(tmp: Path) -> tuple[Path, Path]:
    """The tiny model (with the tokenizer, as LLaMA-Factory loads it) and the sample as a registry."""
    import shutil

    from convert.mcore_to_hf import with_transformers4_rope_keys
    from preprocess.align import align_snapshot
    from testing.sample_data import write_sample_snapshot
    from testing.tiny_models import QWEN_BOS_EOS, make_tiny_model
    from testing.tokenizer import build_qwen25_tokenizer

    hf = make_tiny_model(tmp / "hf", "qwen2", num_layers=4, **QWEN_BOS_EOS)
    # as the release writes it: LLaMA-Factory's transformers 4.52 reads the rotary base at the top level
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(with_transformers4_rope_keys(config), indent=2))
    for file in build_qwen25_tokenizer(tmp / "tokenizer").iterdir():
        shutil.copy(file, hf / file.name)
    data = tmp / "data"
    data.mkdir()
    align_snapshot(write_sample_snapshot(tmp / "snapshot", length_scale=0.05).root, data / "aligned.parquet")
    registry = {  # the recipe's entry: ShareGPT, only the conversations mapped
        "am_sample": {
            "file_name": "aligned.parquet",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations"},
            "tags": {
                "role_tag": "from",
                "content_tag": "value",
                "user_tag": "human",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
    }
    (data / "dataset_info.json").write_text(json.dumps(registry))
    return hf, data


def conversations_of(pack: dict) -> list[tuple]:
    """A LLaMA-Factory pack's conversations: neat packing numbers them 1, 2, ... in the attention mask
    (0 is padding); a token is trained where its label is not -100 (labels are not shifted)."""
    import numpy as np

    ids, segment, labels = (np.asarray(pack[k]) for k in ("input_ids", "attention_mask", "labels"))
    out = []
    for number in range(1, int(segment.max()) + 1):
        where = segment == number
        out.append((ids[where].astype(np.int32), (labels[where] != -100).astype(np.uint8)))
    return out


def write_in_visiting_order(prefix: Path, packs: list[list[tuple]], seq_length: int, vocab_size: int) -> Path:
    """Our dataset of `packs`, placed so that our trainer's pack order (PackOrder, seed SEED) visits them
    in the given order."""
    from sft.data import PackOrder
    from testing.synthetic_packs import write_packed_dataset

    visits = [pack for _, pack in PackOrder([len(packs)], None, SEED).slots(0, len(packs))]
    placed = [None] * len(packs)
    for visit, pack in zip(visits, packs, strict=True):
        placed[visit] = pack
    return write_packed_dataset(prefix, placed, seq_length, vocab_size, PAD_MULTIPLE, template="AM-thinking")


def _train_rank(rank: int, world_size: int, overrides: list[str]) -> dict:
    from sft.config import load_config
    from sft.trainer import Trainer

    return Trainer(load_config(None, overrides), "cpu").train().losses


def model_weights(checkpoint: Path) -> dict:
    from formats.torch_dist import TorchDistReader

    reader = TorchDistReader(checkpoint)
    return {
        key: reader.read(key, (0,) * len(meta.size), tuple(meta.size))
        for key, meta in reader.tensors.items()
        if not key.startswith("optimizer")
    }


def compare(lf_python: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from common.distributed import run_distributed
    from convert.hf_to_mcore import convert_hf_to_mcore
    from formats.packed import padded_lengths
    from models.registry import read_arch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf, data = prepare(tmp)
        lf_out = tmp / "lf"
        lf_out.mkdir()
        subprocess.run(
            [lf_python, __file__, "--lf-train", str(hf), str(data), str(lf_out), str(STEPS)],
            check=True,
            cwd=tmp,
        )
        log = map(json.loads, (lf_out / "trainer_log.jsonl").read_text().splitlines())
        lf_losses = [r["loss"] for r in log if "loss" in r]  # the last line is the run's summary
        packs = [
            conversations_of(json.loads(line)) for line in (lf_out / "packs.jsonl").read_text().splitlines()
        ]
        padded = max(int(padded_lengths([len(c) for c, _ in p], PAD_MULTIPLE).sum()) for p in packs)
        seq_length = -(-max(padded, CUTOFF) // 64) * 64
        prefix = write_in_visiting_order(tmp / "packs" / "lf", packs, seq_length, read_arch(hf).vocab_size)
        convert_hf_to_mcore(hf, tmp / "init", progress=False)
        convert_hf_to_mcore(lf_out, tmp / "lf_mcore", progress=False)
        theirs = model_weights(tmp / "lf_mcore")
        report = {
            "llamafactory_losses": lf_losses,
            "packs": len(packs),
            "conversations": sum(map(len, packs)),
            "seq_length": seq_length,
            "weight_bound": WEIGHT_BOUND,
            "layouts": {},
        }
        for name, (processes, extra) in LAYOUTS.items():
            save_dir = tmp / "runs" / name.replace(" ", "")
            overrides = [
                f"data.prefixes=[{prefix}]",
                f"model.init_checkpoint={tmp / 'init'}",
                f"checkpoint.save_dir={save_dir}",
                f"data.seq_length={seq_length}",
                f"schedule.global_batch_size={GLOBAL_BATCH}",
                f"schedule.train_iters={STEPS}",
                "schedule.warmup_ratio=0.0",
                f"optimizer.lr={LR}",
                "optimizer.min_lr=0.0",
                "model.recompute=none",
                f"seed={SEED}",
                "logging.plot=false",
                "logging.tensorboard=false",
                *extra,
            ]
            losses = run_distributed(_train_rank, processes, overrides)[0]
            ours = model_weights(save_dir / f"iter_{STEPS:07d}")
            assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())
            diffs = {k: float((ours[k] - theirs[k]).abs().max()) for k in ours}
            worst = max(diffs, key=diffs.get)
            weight_diff = diffs[worst]
            loss_diff = max(abs(losses[i + 1] - lf_losses[i]) for i in range(STEPS))
            report["layouts"][name] = {
                "processes": processes,
                "losses": [losses[i + 1] for i in range(STEPS)],
                "max_loss_diff": loss_diff,
                "max_weight_diff": weight_diff,
                "max_weight_diff_tensor": worst,
                "pass": bool(loss_diff <= 5e-5 + 1e-6 and weight_diff <= WEIGHT_BOUND),
            }
        return report


def main() -> int:
    if len(sys.argv) == 6 and sys.argv[1] == "--lf-train":
        train_llamafactory(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--lf-python", required=True, help="python of an environment with llamafactory==0.9.3"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    report = compare(args.lf_python)
    print(
        f"LLaMA-Factory 0.9.3: {report['packs']} packs of {report['conversations']} conversations, "
        f"losses {report['llamafactory_losses']}"
    )
    for name, row in report["layouts"].items():
        print(
            f"{name:>20} ({row['processes']} processes): losses {[round(x, 6) for x in row['losses']]}, "
            f"max |loss - LLaMA-Factory's| {row['max_loss_diff']:.2e} (its log rounds to 1e-4), max |weight "
            f"- LLaMA-Factory's| {row['max_weight_diff']:.2e} (bound {report['weight_bound']:g}) -> "
            f"{'PASS' if row['pass'] else 'FAIL'}"
        )
    if args.json:
        from common.files import write_json_atomic

        write_json_atomic(args.json, report)
    return 0 if all(row["pass"] for row in report["layouts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
