"""The trainer end to end on CPU (gloo processes): layout invariance against a single-process run, the
packed loss against transformers conversation by conversation, exact resumption (after a kill during a
save and after a stop signal, across an epoch boundary), asynchronous fully-parallel checkpoints
(resumed after a kill mid-write, bitwise like synchronous ones), non-finite steps, the learning-rate schedule
in closed form, and run validation."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.distributed import run_distributed
from formats.run_files import TRAINING_DATA_FILE
from sft.data import make_micro_batch
from sft.metrics import read_metrics
from testing.fixtures import TrainingInputs, checkpoint_weights, training_inputs
from testing.hf_reference import conversation_loss, hf_model
from testing.synthetic_packs import random_packs, write_packed_dataset
from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL

from trainer_ranks import train

SEQ = 64
PACKS = 12
GLOBAL_BATCH = 4
ITERS = 6  # 2 epochs x 12 packs / 4 per step; the epoch boundary lies between iterations 3 and 4
VALID_PACKS = 5  # held out (PREFIX_valid); fills no layout's rows evenly, so empty rows complete them
EVAL_INTERVAL = 3  # validation losses after iterations 3 and 6
CURVES = ("logging.tensorboard=true", "logging.plot=true")  # off in the other runs (testing/fixtures.py)
LR, WARMUP_RATIO = 1e-2, 0.2


# Conversations padded to a multiple of 8 fit each pack: the data serves CP2 with TP2+SP (2 x 2 x 2)
PAD_MULTIPLE = 8


def _make_setup(root: Path, tied: bool, layers: int = 4) -> TrainingInputs:
    packs = random_packs(PACKS, SEQ, QWEN25_VOCAB_SIZE_SMALL, seed=0, pad_multiple=PAD_MULTIPLE)
    packs[-1] = [_prompt_heavy_conversation(seed=2)]
    valid = random_packs(VALID_PACKS, SEQ, QWEN25_VOCAB_SIZE_SMALL, seed=1, pad_multiple=PAD_MULTIPLE)
    return training_inputs(
        root, packs, SEQ, layers=layers, tied=tied, valid_packs=valid, pad_multiple=PAD_MULTIPLE
    )


def _prompt_heavy_conversation(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One row-long conversation trained only on tokens 1 to 10: with CP2 its targets (positions 0 to 9)
    all lie in chunk 0, so context-parallel rank 1 (chunks 1 and 2) holds no loss token of its micro-batch."""
    ids = np.random.default_rng(seed).integers(0, QWEN25_VOCAB_SIZE_SMALL, size=SEQ, dtype=np.int32)
    mask = np.zeros(SEQ, dtype=np.uint8)
    mask[1:11] = 1
    return ids, mask


def _overrides(setup: TrainingInputs, save_dir: Path, *extra: str) -> list[str]:
    return setup.overrides(
        save_dir,
        f"schedule.global_batch_size={GLOBAL_BATCH}",
        f"optimizer.lr={LR}",
        f"schedule.warmup_ratio={WARMUP_RATIO}",
        "checkpoint.save_interval=2",
        "checkpoint.keep_last_n=null",
        "model.recompute=none",
        f"eval.interval={EVAL_INTERVAL}",
        *extra,
    )


def _train(setup, save_dir: Path, world_size: int = 1, *extra: str, fault=None) -> dict:
    return run_distributed(train, world_size, _overrides(setup, save_dir, *extra), fault)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return _make_setup(tmp_path_factory.mktemp("trainer"), tied=False)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    """The single-process run (TP1/PP1/DP1, 4 micro-batches of one pack) every other run is compared with."""
    save_dir = tmp_path_factory.mktemp("reference")
    result = _train(setup, save_dir, 1, *CURVES, fault=("record", 0))
    assert result["iterations"] == ITERS and not result["stopped"]
    return SimpleNamespace(
        losses=result["losses"],
        hooks=result["hooks"],
        save_dir=save_dir,
        weights=checkpoint_weights(save_dir / "iter_0000006"),
        val_losses=_val_losses(save_dir),
    )


def _tensorboard_scalars(save_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar, read back by TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _val_losses(save_dir: Path) -> dict[int, float]:
    return {r["iteration"]: r["val_loss"] for r in read_metrics(save_dir / "metrics.jsonl")[1]}


# Final weights: Adam divides each gradient by its running RMS, so entries whose gradients are ~eps
# (rarely hit embedding rows, some biases) move by up to one full step lr in either direction on
# summation-order noise; 1% of one step (lr x 1e-2) bounds what was observed (4.5e-5 at TP2).
WEIGHT_ATOL = LR * 1e-2


def _assert_same_training(
    run: dict, save_dir: Path, reference, rtol: float = 1e-5, weight_atol: float = WEIGHT_ATOL
) -> None:
    assert sorted(run["losses"]) == list(range(1, ITERS + 1))
    for iteration, loss in reference.losses.items():
        assert run["losses"][iteration] == pytest.approx(loss, rel=rtol), iteration
    val_losses = _val_losses(save_dir)
    assert sorted(val_losses) == sorted(reference.val_losses) == [EVAL_INTERVAL, ITERS]
    for iteration, loss in reference.val_losses.items():
        assert val_losses[iteration] == pytest.approx(loss, rel=rtol), ("validation", iteration)
    weights = checkpoint_weights(save_dir / f"iter_{ITERS:07d}")
    assert weights.keys() == reference.weights.keys()
    for key, value in reference.weights.items():
        assert torch.allclose(weights[key], value, rtol=0, atol=weight_atol), (
            key,
            (weights[key] - value).abs().max(),
        )


LAYOUTS = {
    "tp2-selective-recompute": (
        2,
        ["parallel.tensor=2", "parallel.micro_batch_size=2", "model.recompute=selective"],
    ),
    "pp2-full-recompute": (2, ["parallel.pipeline=2", "model.recompute=full"]),
    "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    "pp2xvp2-interleaved": (2, ["parallel.pipeline=2", "parallel.virtual_pipeline=2"]),
    "tp2-sp": (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    # one layer per stage: the two middle stages get packed rows from the stage before, not the data
    "pp4-middle-stages": (4, ["parallel.pipeline=4"]),
    # every micro-batch split over two ranks; one of them holds no loss token of the last pack's row
    "cp2": (2, ["parallel.context=2"]),
    "tp2-sp-cp2": (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.context=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_train_like_one_process(setup, reference, layout, tmp_path):
    world_size, extra = LAYOUTS[layout]
    run = _train(setup, tmp_path, world_size, *extra)
    _assert_same_training(run, tmp_path, reference)


def test_the_prompt_heavy_pack_leaves_a_context_parallel_rank_without_loss_tokens():
    """The layouts with CP2 above see a micro-batch whose second CP rank holds only masked tokens (a
    rank dividing by its own token count would give NaN there): shown on the row they build."""
    from plan.layout import ParallelLayout
    from sft.data import split_for_context_parallel

    ids, mask = _prompt_heavy_conversation(seed=2)
    pack = SimpleNamespace(input_ids=ids, loss_mask=mask, lengths=np.array([SEQ]))
    for extra in ({}, {"tensor": 2, "sequence_parallel": True}):
        layout = ParallelLayout(context=2, **extra)
        row = make_micro_batch([pack], SEQ, pad_multiple=layout.pad_multiple)
        ranks = [split_for_context_parallel(row, 2, rank).loss_mask.sum().item() for rank in (0, 1)]
        assert ranks == [10.0, 0.0]


RECIPE_SHAPE = ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.context=2"]


@pytest.mark.slow
def test_the_recipe_layout_scaled_down_trains_like_one_process_and_resumes_without_cp(
    setup, reference, tmp_path
):
    """The K2 layout (TP4+SP x CP4 x PP8) at a CPU's scale: TP2+SP x CP2 x PP2 in eight processes trains
    like one; its checkpoint of iteration 4 resumes at TP2+SP x PP2 (no context parallelism, the
    optimizer state resharded from 2 data x context replicas to 1) and continues like one process, and
    is refused by name in one process (its optimizer state is per data-parallel shard)."""
    run = _train(setup, tmp_path / "k2", 8, *RECIPE_SHAPE, "parallel.pipeline=2")
    _assert_same_training(run, tmp_path / "k2", reference)

    # its optimizer state is per data-parallel shard (the default): no resume at another TP/PP
    shutil.copytree(tmp_path / "k2" / "iter_0000004", tmp_path / "refused" / "iter_0000004")
    with pytest.raises(
        RuntimeError,
        match=r"saved at another tensor/pipeline/expert layout .*'tensor': \(2, 1\)"
        r".*checkpoint.reshardable_optimizer=true",
    ):
        _train(setup, tmp_path / "refused", 1)
    shutil.copytree(tmp_path / "k2" / "iter_0000004", tmp_path / "resumed" / "iter_0000004")
    layout = ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.pipeline=2"]
    resumed = _train(setup, tmp_path / "resumed", 4, *layout)
    assert sorted(resumed["losses"]) == [5, 6]
    for iteration in (5, 6):
        assert resumed["losses"][iteration] == pytest.approx(reference.losses[iteration], rel=1e-5)
    assert _val_losses(tmp_path / "resumed")[ITERS] == pytest.approx(reference.val_losses[ITERS], rel=1e-5)
    final = checkpoint_weights(tmp_path / "resumed" / f"iter_{ITERS:07d}")
    assert final.keys() == reference.weights.keys()
    for key, value in reference.weights.items():
        assert torch.allclose(final[key], value, rtol=0, atol=WEIGHT_ATOL), key


@pytest.fixture(scope="module")
def data_parallel(setup, tmp_path_factory):
    """DP2 with 2 micro-batches per rank, synchronous saves, each tensor written by one replica."""
    save_dir = tmp_path_factory.mktemp("dp2")
    run = _train(setup, save_dir, 2, "checkpoint.fully_parallel_save=false")
    return SimpleNamespace(run=run, save_dir=save_dir)


@pytest.mark.slow
def test_data_parallel_with_accumulation_trains_like_one_process(data_parallel, reference):
    _assert_same_training(data_parallel.run, data_parallel.save_dir, reference)


def _bytes_written_by_rank(checkpoint: Path) -> dict[int, int]:
    written: dict[int, int] = {}
    for file in checkpoint.glob("__*_*.distcp"):
        rank = int(file.name.split("_")[2])
        written[rank] = written.get(rank, 0) + file.stat().st_size
    return written


@pytest.mark.slow
def test_async_fully_parallel_checkpoints_resume_bitwise_like_synchronous_ones(
    setup, data_parallel, tmp_path
):
    background = (
        "checkpoint.async_save=true",
        "checkpoint.fully_parallel_load=true",
    )  # parallel save: default
    # 1. Writers slowed down; killed during iteration 5 while the checkpoint of iteration 4 is being written.
    crashed = _train(setup, tmp_path, 2, *background, fault=("crash_during_async_save", 4))
    assert "killed during iteration 5" in crashed["crashed"]
    assert crashed["saves_saw"] == {2: [], 4: [2]}  # each save began once the previous one was published
    assert (tmp_path / "iter_0000004.partial").is_dir() and not (tmp_path / "iter_0000004").exists()
    # 2. Resumes from iteration 2 (read in parallel by the two replicas), keeping only the newest checkpoint.
    finished = _train(setup, tmp_path, 2, *background, "checkpoint.keep_last_n=1")
    assert sorted(finished["losses"]) == [3, 4, 5, 6]
    assert all(finished["losses"][i] == data_parallel.run["losses"][i] for i in finished["losses"])  # bitwise
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("iter_")) == ["iter_0000006"]
    final = checkpoint_weights(tmp_path / "iter_0000006")
    expected = checkpoint_weights(data_parallel.save_dir / "iter_0000006")
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)
    # Replicas split the model's tensors: rank 1 writes more than its own optimizer shard.
    parallel = _bytes_written_by_rank(tmp_path / "iter_0000006")
    single = _bytes_written_by_rank(data_parallel.save_dir / "iter_0000006")
    assert single[1] < single[0] and parallel[1] > single[1] and parallel[0] < single[0], (parallel, single)
    assert sum(parallel.values()) == pytest.approx(sum(single.values()), rel=0.01)


# bf16 weights and activations against fp32, per-iteration loss after 6 steps at lr 1e-2 (bf16 keeps 8
# mantissa bits: each matmul input is rounded by up to 2^-9 relative; the losses stay far closer).
BF16_LOSS_RTOL = 2e-3
BF16_VAL_LOSS_RTOL = 5e-3  # a held-out loss after the run's drift through 3 or 6 bf16 steps


@pytest.mark.slow
def test_bf16_trains_like_fp32_within_tolerance_and_resumes_exactly(setup, reference, tmp_path):
    """The GPU path's precision on CPU: megatron-core's Float16Module over bf16 weights, fp32 gradients and
    fp32 main weights and moments in the distributed optimizer (sharded over DP2), saved and resumed."""
    whole = _train(setup, tmp_path / "whole", 2, "model.precision=bf16")
    assert sorted(whole["losses"]) == list(range(1, ITERS + 1))
    for iteration, loss in reference.losses.items():
        assert whole["losses"][iteration] == pytest.approx(loss, rel=BF16_LOSS_RTOL), iteration
    assert whole["losses"] != reference.losses  # bf16 really ran: not the fp32 numbers
    for iteration, loss in reference.val_losses.items():
        assert _val_losses(tmp_path / "whole")[iteration] == pytest.approx(loss, rel=BF16_VAL_LOSS_RTOL)

    from formats.torch_dist import TorchDistReader

    stored = TorchDistReader(tmp_path / "whole" / "iter_0000004")
    dtypes = {key: stored.dtype(key) for key in stored.tensors}
    model = {k: d for k, d in dtypes.items() if not k.startswith("optimizer")}
    main = {k: d for k, d in dtypes.items() if k.rsplit(".", 1)[-1] in ("param", "exp_avg", "exp_avg_sq")}
    assert model.keys() == reference.weights.keys() and set(model.values()) == {torch.bfloat16}
    assert len(main) == 3 and set(main.values()) == {torch.float32}, dtypes

    shutil.copytree(tmp_path / "whole" / "iter_0000004", tmp_path / "resumed" / "iter_0000004")
    resumed = _train(setup, tmp_path / "resumed", 2, "model.precision=bf16")
    assert resumed["losses"] == {i: whole["losses"][i] for i in (5, 6)}  # bitwise
    final, expected = (checkpoint_weights(tmp_path / run / "iter_0000006") for run in ("resumed", "whole"))
    assert all(torch.equal(final[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_prefetching_the_next_batch_changes_nothing(setup, reference, tmp_path):
    """The reference run prepares each next step's micro-batches in a background thread; without it the
    batches, hence the losses and weights, are bitwise the same."""
    run = _train(setup, tmp_path, 1, "data.prefetch=false")
    assert run["losses"] == reference.losses
    final = checkpoint_weights(tmp_path / f"iter_{ITERS:07d}")
    assert all(torch.equal(final[k], reference.weights[k]) for k in final)


@pytest.mark.slow
def test_tied_embeddings_train_alike_across_pipeline_stages(tmp_path):
    root = tmp_path
    tied = _make_setup(root, tied=True)
    single = _train(tied, root / "single")
    reference = SimpleNamespace(
        losses=single["losses"],
        weights=checkpoint_weights(root / "single" / "iter_0000006"),
        val_losses=_val_losses(root / "single"),
    )
    _assert_same_training(_train(tied, root / "pp2", 2, "parallel.pipeline=2"), root / "pp2", reference)


@pytest.mark.slow
def test_a_deep_interleaved_pipeline_trains_like_one_process(tmp_path):
    """PP4 x VP2 on 8 layers: eight model chunks, one layer each, every rank holding a middle chunk, and
    packs of several conversations crossing each stage boundary of the interleaved 1F1B schedule."""
    root = tmp_path
    deep = _make_setup(root, tied=False, layers=8)
    single = _train(deep, root / "single")
    reference = SimpleNamespace(
        losses=single["losses"],
        weights=checkpoint_weights(root / "single" / f"iter_{ITERS:07d}"),
        val_losses=_val_losses(root / "single"),
    )
    run = _train(deep, root / "pp4xvp2", 4, "parallel.pipeline=4", "parallel.virtual_pipeline=2")
    _assert_same_training(run, root / "pp4xvp2", reference)


def _transformers_loss(hf_dir: Path, conversations) -> tuple[float, int]:
    """(sum of token losses, loss tokens) of each conversation run alone through transformers' Qwen2."""
    return conversation_loss(hf_model(hf_dir), conversations)


def _valid_loss_tokens(setup) -> int:
    return sum(int(mask[1:].sum()) for pack in setup.valid_packs for _, mask in pack)


@pytest.mark.slow
def test_first_loss_equals_transformers_conversation_by_conversation(setup, reference):
    """The packed first-iteration loss (initial weights) is the token-weighted mean of each conversation's
    loss computed alone by transformers' Qwen2, from the HF checkpoint the run was converted from."""
    from sft.data import PackOrder

    slots = PackOrder([PACKS], None, seed=1234).slots(0, GLOBAL_BATCH)
    total, count = _transformers_loss(setup.hf, [conv for _, pack in slots for conv in setup.packs[pack]])
    assert reference.losses[1] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.slow
def test_recipe_loss_weighting_per_group_of_packs(setup, reference, tmp_path):
    """loss.normalization=per_group: the first loss is the mean over the step's two groups of two packs
    of each group's per-token loss computed by transformers, and DP2 and TP2+SP x CP2 train like one
    process."""
    from sft.data import PackOrder

    per_group = ("loss.normalization=per_group", "loss.group_size=2", "schedule.train_iters=3")
    single = _train(setup, tmp_path / "one", 1, *per_group)
    slots = PackOrder([PACKS], None, seed=1234).slots(0, GLOBAL_BATCH)
    sums = [
        _transformers_loss(setup.hf, [conv for _, pack in group for conv in setup.packs[pack]])
        for group in (slots[:2], slots[2:])
    ]
    recipe_mean = sum(total / count for total, count in sums) / 2
    global_mean = sum(total for total, _ in sums) / sum(count for _, count in sums)
    assert abs(recipe_mean - global_mean) > 4e-5 * global_mean  # the check below tells the two apart
    assert single["losses"][1] == pytest.approx(recipe_mean, rel=1e-5)
    data_parallel = _train(setup, tmp_path / "dp2", 2, *per_group)
    context_parallel = _train(setup, tmp_path / "cp2", 4, *per_group, *RECIPE_SHAPE)
    for iteration, loss in single["losses"].items():
        assert data_parallel["losses"][iteration] == pytest.approx(loss, rel=1e-5), iteration
        assert context_parallel["losses"][iteration] == pytest.approx(loss, rel=1e-5), iteration


@pytest.mark.slow
def test_validation_loss_equals_transformers_on_the_held_out_files(
    setup, reference, qwen_tokenizer_dir, tmp_path
):
    """The final validation loss is the per-token loss transformers computes with the final weights
    (exported by the project's converter) over every conversation read back from the PREFIX_valid files."""
    from convert.mcore_to_hf import convert_mcore_to_hf
    from formats.packed import PackedDataset, validation_prefix

    convert_mcore_to_hf(  # synthetic data records no real template: name one
        reference.save_dir,
        tmp_path / "hf",
        iteration=ITERS,
        tokenizer_dir=qwen_tokenizer_dir,
        chat_template="AM-thinking",
    )
    held_out = PackedDataset(validation_prefix(setup.prefix))
    conversations = []
    for i in range(len(held_out)):
        pack = held_out[i]
        cuts = np.cumsum(pack.lengths)[:-1]
        conversations += zip(np.split(pack.input_ids, cuts), np.split(pack.loss_mask, cuts), strict=True)
    assert len(held_out) == VALID_PACKS
    total, count = _transformers_loss(tmp_path / "hf", conversations)
    assert count == _valid_loss_tokens(setup)
    assert reference.val_losses[ITERS] == pytest.approx(total / count, rel=1e-5)


def _closed_form_lr(step: int) -> float:
    """HF's get_cosine_schedule_with_warmup (what the recipe ran) at optimizer step `step` (0-based)."""
    warmup = math.ceil(WARMUP_RATIO * ITERS)
    if step < warmup:
        return LR * step / warmup
    return LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (ITERS - warmup)))


@pytest.mark.slow
def test_the_loop_calls_each_callback_hook_in_order(reference):
    """A callback sees the run start, each step before and after (with the step's loss, the one the run
    returns) and the end: the seam the fault-injection tests use (tests/trainer_ranks.py)."""
    steps = [
        call
        for i in range(ITERS)
        for call in (("before_step", i), ("after_step", i + 1, reference.losses[i + 1], True))
    ]
    assert reference.hooks == [("on_start", 0), *steps, ("on_end", ITERS, False)]


@pytest.mark.slow  # a training run, a subprocess or a full pipeline: test-fast stays under 90 s
def test_schedule_and_metrics_file(setup, reference):
    records, validations = read_metrics(reference.save_dir / "metrics.jsonl")
    assert [(r["iteration"], r["val_packs"]) for r in validations] == [(3, VALID_PACKS), (6, VALID_PACKS)]
    assert all(r["val_loss_tokens"] == _valid_loss_tokens(setup) for r in validations)
    # TensorBoard holds the same scalars; the curves were drawn at the end of the run.
    for tag, lines in (("loss", records), ("lr", records), ("val_loss", validations)):
        expected = [(r["iteration"], pytest.approx(r[tag], rel=1e-6)) for r in lines]
        assert _tensorboard_scalars(reference.save_dir, tag) == expected, tag
    assert (reference.save_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    for r in records:
        assert r["lr"] == pytest.approx(_closed_form_lr(r["iteration"] - 1), abs=1e-12)
        assert r["loss"] == pytest.approx(reference.losses[r["iteration"]], rel=1e-12)
        assert r["loss_tokens"] > 0 and r["tokens"] > r["loss_tokens"] and r["tflops_per_device"] > 0
        assert 0 < r["mfu"] < 1 and r["skipped_steps"] == 0
    assert records[-1]["epoch"] == 2.0
    # Each checkpoint records the chat template its data was encoded with and its setting, for the export.
    recorded = reference.save_dir / "iter_0000006" / TRAINING_DATA_FILE
    assert json.loads(recorded.read_text()) == {"chat_template": "synthetic", "enable_thinking": True}


@pytest.mark.slow
def test_resume_is_exact_after_a_kill_during_a_save_and_after_a_signal(setup, reference, tmp_path):
    # 1. Killed while writing the checkpoint of iteration 4: iteration 2 stays the latest complete one.
    crashed = _train(setup, tmp_path, 1, *CURVES, fault=("crash_in_save", 4))
    assert "killed while saving iteration 4" in crashed["crashed"]
    assert (tmp_path / "iter_0000004.partial").is_dir() and not (tmp_path / "iter_0000004").exists()
    # 2. Resumes from iteration 2 (crossing the epoch boundary after 3); SIGUSR1 during iteration 5.
    stopped = _train(setup, tmp_path, 1, *CURVES, fault=("signal", 5))
    assert stopped["stopped"] and sorted(stopped["losses"]) == [3, 4, 5]
    assert not (tmp_path / "iter_0000004.partial").exists() and (tmp_path / "iter_0000005").is_dir()
    # 3. The signal's checkpoint loses a data file (a node died mid-copy): resume=auto skips it, resumes
    #    from iteration 4 and finishes.
    assert (tmp_path / "iter_0000004").is_dir()
    lost = sorted((tmp_path / "iter_0000005").glob("*.distcp"))[0]
    lost.unlink()
    finished = _train(setup, tmp_path, 1, *CURVES)
    assert sorted(finished["losses"]) == [5, 6]
    resumed = {**stopped["losses"], **finished["losses"]}
    assert all(resumed[i] == reference.losses[i] for i in resumed), (resumed, reference.losses)  # bitwise
    final = checkpoint_weights(tmp_path / "iter_0000006")
    assert all(torch.equal(final[k], reference.weights[k]) for k in final)
    records = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert [step for step, _ in _tensorboard_scalars(tmp_path, "loss")] == list(range(1, ITERS + 1))
    assert [r["iteration"] for r in records] == list(
        range(1, ITERS + 1)
    )  # the crashed attempt's lines are gone


@pytest.mark.slow
@pytest.mark.parametrize("where", ["step", "validation"])
def test_a_frozen_rank_ends_the_others_within_the_watchdog_bound(where, setup, tmp_path, capfd):
    from sft.watchdog import EXIT_HUNG

    watchdog = ("watchdog.min_step_seconds=4", "watchdog.step_factor=5")
    # the validation after iteration 3 forwards 5 packs, global batches' worth 1.25: its bound's share
    fault = ("freeze", 3) if where == "step" else ("freeze_in_validation", EVAL_INTERVAL)
    with pytest.raises(RuntimeError, match=rf"rank 0 exited with status {EXIT_HUNG} without a result"):
        _train(setup, tmp_path, 2, *watchdog, fault=fault)
    err = capfd.readouterr().err
    report = re.search(
        rf"rank 0: iteration {fault[1]} has spent (\d+) s in phase '([^']+)', past the bound of (\d+) s", err
    )
    assert report, err[-3000:]
    spent, phase, bound = int(report.group(1)), report.group(2), int(report.group(3))
    assert phase.startswith("forward-backward" if where == "step" else "validation")
    assert 4 <= bound <= spent <= bound + 2  # whole seconds
    assert (f"{VALID_PACKS / GLOBAL_BATCH:g} steps' worth of max(" in err) == (where == "validation")
    assert "Stacks of this process" in err and "Thread" in err  # where it hung, for the post-mortem


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_and_too_many_abort(setup, tmp_path):
    run = _train(setup, tmp_path / "once", 1, "schedule.train_iters=3", fault=("nan_loss", 2))
    assert math.isnan(run["losses"][2]) and run["skipped"] == 1
    assert math.isfinite(run["losses"][1]) and math.isfinite(run["losses"][3])
    with pytest.raises(RuntimeError, match="2 consecutive iterations"):
        _train(
            setup,
            tmp_path / "always",
            1,
            "schedule.train_iters=3",
            "schedule.max_consecutive_nonfinite=2",
            fault=("nan_loss", 0),
        )


@pytest.mark.slow
def test_a_callbacks_state_is_saved_with_the_checkpoint_and_resumed(setup, tmp_path):
    """The guard's count of skipped steps in a row lives in the checkpoint: one skipped step before a
    crash and one right after the resume are two in a row (a guard that forgot would train on)."""
    from megatron.core import dist_checkpointing

    save_dir, limit = tmp_path / "run", "schedule.max_consecutive_nonfinite=2"
    crashed = _train(setup, save_dir, 1, limit, fault=[("nan_loss", 2), ("crash_after", 2)])
    assert crashed["iteration"] == 2
    saved = dist_checkpointing.load_common_state_dict(str(save_dir / "iter_0000002"))
    assert saved["callbacks"] == {"NonFiniteGuard": {"consecutive": 1}}
    with pytest.raises(RuntimeError, match="2 consecutive iterations \\(up to 3\\)"):
        _train(setup, save_dir, 1, limit, fault=("nan_loss", 3))


def test_run_checks_name_the_problem_before_training(setup, tmp_path):
    from common.errors import CheckpointError, ConfigError, DataError
    from sft.config import load_config
    from sft.preflight import check_run, schedule_summary

    config = load_config(None, _overrides(setup, tmp_path) + ["data.seq_length=128"])
    with pytest.raises(
        ConfigError,
        match=r"data.seq_length=128 but the data was packed at 64: re-pack it at 128 "
        r"\(tools/preprocess_sft.py --seq-length 128: .*\), or train at data.seq_length=64",
    ):
        check_run(config, world_size=1, device="cpu")
    wide = write_packed_dataset(tmp_path / "wide", random_packs(4, SEQ, 10, seed=0), SEQ, vocab_size=200_000)
    config = load_config(None, _overrides(setup, tmp_path) + [f"data.prefixes=[{wide}]"])
    with pytest.raises(DataError, match="200000 tokens, the model's vocabulary only 151936"):
        check_run(config, world_size=1, device="cpu")
    llama_data = write_packed_dataset(
        tmp_path / "llama", random_packs(4, SEQ, 10, seed=0), SEQ, 1000, template="llama3"
    )
    config = load_config(None, _overrides(setup, tmp_path) + [f"data.prefixes=[{llama_data}]"])
    with pytest.raises(DataError, match="llama3 chat template, which a Qwen2 / Qwen2.5 model does not speak"):
        check_run(config, world_size=1, device="cpu")
    config = load_config(None, _overrides(setup, tmp_path) + ["schedule.train_iters=1"])
    with pytest.raises(ConfigError, match=r"warmup_ratio=0.2 of 1 iteration\(s\) is 1 warm-up step\(s\)"):
        check_run(config, world_size=1, device="cpu")  # megatron-core's scheduler would only assert
    # a global batch larger than the data: that is the cause named, not the warm-up it leaves no room for
    for global_batch, steps in ((PACKS + 4, 1), (3 * PACKS, 0)):
        config = load_config(None, _overrides(setup, tmp_path, f"schedule.global_batch_size={global_batch}"))
        with pytest.raises(
            ConfigError,
            match=rf"schedule.global_batch_size={global_batch} packs is larger than the data's {PACKS} "
            rf"packs, so 2 epochs make {steps} optimizer step\(s\), too few to warm up and decay: lower "
            rf"schedule.global_batch_size \(at most {PACKS}: one step per epoch\), set schedule.train_iters",
        ):
            check_run(config, world_size=1, device="cpu")
    assert schedule_summary(3, 8, 4) == "3 iterations of 8 packs (6 epochs over 4 packs)"  # not the 2 set
    assert schedule_summary(ITERS, GLOBAL_BATCH, PACKS) == "6 iterations of 4 packs (2 epochs over 12 packs)"
    assert schedule_summary(1, 4, 12) == "1 iterations of 4 packs (0.333 epochs over 12 packs)"
    # ... which schedule.train_iters repeats enough to train on
    config = load_config(
        None, _overrides(setup, tmp_path, f"schedule.global_batch_size={PACKS + 4}", "schedule.train_iters=3")
    )
    assert check_run(config, world_size=1, device="cpu").train_iters == 3
    config = load_config(None, _overrides(setup, tmp_path) + ["parallel.tensor=3"])
    with pytest.raises(ConfigError, match="parallel.tensor=3 must divide the attention heads"):
        check_run(config, world_size=3, device="cpu")
    damaged = shutil.copytree(setup.mcore, tmp_path / "damaged")
    next(damaged.glob("*.distcp")).unlink()
    config = load_config(None, _overrides(setup, tmp_path) + [f"model.init_checkpoint={damaged}"])
    with pytest.raises(CheckpointError, match=r"damaged is damaged: missing __\d_\d\.distcp"):
        check_run(config, world_size=1, device="cpu")
