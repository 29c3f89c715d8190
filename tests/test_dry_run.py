"""The dry run (sft/dry_run/): its memory tracker by hand, against the CPU allocator on real tensors, the
planner against it on several layouts, and `pretrain_sft.py --dry-run` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from common.errors import ConfigError
from sft.config import load_config
from sft.dry_run import plan_ranks, planner_estimate
from sft.dry_run.tracker import MemoryTracker
from testing.dry_run_checks import (
    allocator_peak,
    in_fresh_process,
    measure_in_one_process,
    write_dry_run_model,
)

TINY = ["model.recompute=none", "data.seq_length=1024", "schedule.global_batch_size=8"]

# (GPUs, overrides): every kind of layout the trainer accepts, each on a few ranks
LAYOUTS = {
    "TP2 SP CP2 PP2": (
        16,
        ["parallel.tensor=2", "parallel.pipeline=2", "parallel.context=2", "parallel.sequence_parallel=true"],
    ),
    "TP2 PP2 VP2, micro-batch 2, full recompute": (
        8,
        [
            "parallel.tensor=2",
            "parallel.pipeline=2",
            "parallel.virtual_pipeline=2",
            "parallel.micro_batch_size=2",
            "schedule.global_batch_size=16",
            "model.recompute=full",
        ],
    ),
    "PP4 DP2, selective recompute": (8, ["parallel.pipeline=4", "model.recompute=selective"]),
    "TP2 DP2, MLP recompute": (
        4,
        ["parallel.tensor=2", "model.recompute=selective", "model.recompute_modules=[mlp]"],
    ),
    "one GPU": (1, []),
}
# a mixture of experts' layouts: expert parallelism with pipeline stages, and inside tensor parallelism
MOE_LAYOUTS = {
    "EP2 PP2": (4, ["parallel.expert=2", "parallel.pipeline=2"]),
    "TP2 SP ETP1 EP2, MoE recompute": (
        4,
        [
            "parallel.tensor=2",
            "parallel.sequence_parallel=true",
            "parallel.expert=2",
            "parallel.expert_tensor=1",
            "model.recompute=selective",
            "model.recompute_modules=[moe]",
        ],
    ),
}


@pytest.fixture(scope="module")
def dry_run_model(tmp_path_factory):
    return write_dry_run_model(tmp_path_factory.mktemp("dry_run_model"))


def _plans(model: str, gpus: int, overrides: list[str]):
    config = load_config(None, [f"model.random_init_config={model}", *TINY, *overrides])
    arch, plans = plan_ranks(config, gpus)
    return config, arch, plans


def test_the_tracker_counts_each_storage_once_while_it_lives():
    tracker = MemoryTracker()
    with tracker:
        with tracker.part("weights"):
            weight = torch.zeros(1000)  # 4,000 bytes
        with tracker.part("activations"):
            x = torch.ones(500, dtype=torch.bfloat16)  # 1,000 bytes
            view = x.view(10, 50)  # the same storage: not counted again
            y = x * 2  # 1,000 bytes
        assert tracker.live_bytes == 6000 and tracker.live["activations"] == 2000
        del x, y
        assert tracker.live_bytes == 5000  # y freed; x's storage lives on in its view
        del view
        assert tracker.live_bytes == 4000
        tracker.assign([weight], "optimizer")
        assert tracker.live["optimizer"] == 4000 and tracker.live["weights"] == 0
    assert tracker.peak_bytes == 6000
    assert tracker.peak_parts == {
        "weights": 4000,
        "grads": 0,
        "optimizer": 0,
        "activations": 2000,
        "logits": 0,
        "other": 0,
    }


def test_the_stand_ins_are_installed_only_inside_the_dry_run():
    import torch.distributed as dist
    from megatron.core.models.common.language_module import language_module
    from megatron.core.tensor_parallel import layers

    from sft.dry_run.kernels import dry_run_patches

    before = (dist.all_gather_object, language_module.te_parallel_cross_entropy, torch.optim.AdamW)
    with dry_run_patches():
        assert torch.optim.AdamW is not before[2] and hasattr(layers, "fused_weight_gradient_mlp_cuda")
    assert (dist.all_gather_object, language_module.te_parallel_cross_entropy, torch.optim.AdamW) == before
    assert not hasattr(layers, "fused_weight_gradient_mlp_cuda")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["TP2 SP CP2 PP2", "TP2 PP2 VP2, micro-batch 2, full recompute"])
def test_the_tracker_agrees_with_the_allocator_on_real_tensors(dry_run_model, layout):
    """The same rank on real (zero-filled) tensors: the tracker's peak against the allocator's, from
    torch's profiler (every allocation and free, in time order), within 3%, and the fake run's peak
    equal to the real one's within 0.5% (fake tensors change nothing the tracker counts)."""
    gpus, overrides = LAYOUTS[layout]
    _, _, plans = _plans(dry_run_model, gpus, overrides)
    fake = measure_in_one_process(plans)
    for plan, faked in zip(plans, fake, strict=True):
        real = in_fresh_process(allocator_peak, plan)
        assert real["tracked"] == pytest.approx(real["allocator"], rel=0.03), (plan.rank, real)
        assert faked["peak_bytes"] == pytest.approx(real["tracked"], rel=0.005), (plan.rank, faked, real)


@pytest.mark.slow
def test_the_planner_agrees_with_the_dry_run_on_every_kind_of_layout(dry_run_model):
    """Per measured stage: weights, gradients and optimizer state within 1%, the total within 12% (the
    planner's transients are a model of the backward's working set, and under full recomputation it
    adds the logits to the recomputation's peak, which do not coincide)."""
    for name in LAYOUTS:
        _assert_the_planner_agrees(dry_run_model, name)


@pytest.mark.slow
def test_the_dry_run_measures_qwen3_with_its_query_key_norms_under_sequence_parallelism(tmp_path):
    """Qwen3's per-head q/k norms get the stand-in norm too (megatron-core's torch norm refuses sequence
    parallelism), and the planner counts what they keep."""
    _assert_the_planner_agrees(write_dry_run_model(tmp_path, "qwen3"), "TP2 SP CP2 PP2")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MOE_LAYOUTS))
def test_the_dry_run_measures_a_mixture_of_experts(tmp_path, name):
    """Qwen3 MoE with its routing balanced (the dispatcher's stand-in; the experts, the router and the
    rest are megatron-core's own modules on fake tensors): the planner counts the experts' weights over
    EP x ETP, their optimizer state over the expert-data-parallel replicas, and what the MoE layer keeps."""
    model = write_dry_run_model(tmp_path, "qwen3_moe", moe_intermediate_size=256)
    _assert_the_planner_agrees(model, name, MOE_LAYOUTS)


def _assert_the_planner_agrees(model: str, name: str, layouts: dict = LAYOUTS) -> None:
    gpus, overrides = layouts[name]
    config, arch, plans = _plans(model, gpus, overrides)
    estimates = planner_estimate(config, arch, gpus, 80.0)
    for plan, measured in zip(plans, measure_in_one_process(plans), strict=True):
        estimate = estimates[plan.stage_name]
        for part in ("weights", "grads", "optimizer"):
            assert estimate[part] * 1e9 == pytest.approx(measured["parts"][part], rel=0.01), (name, part)
        total = sum(estimate.values()) * 1e9
        assert total == pytest.approx(measured["peak_bytes"], rel=0.12), (name, plan.stage_name)


def _dry_run_arguments(dry_run_model: str | None, report_file) -> list[str]:
    common = ["--dry-run", "--gpus", "16", "--dry-run-json", str(report_file)]
    model = [f"model.random_init_config={dry_run_model}"] if dry_run_model else []
    return [*common, *model, *TINY, *LAYOUTS["TP2 SP CP2 PP2"][1]]


@pytest.mark.slow  # two measured ranks, each its own process: test-fast stays under 90 s
def test_dry_run_reports_each_stage(dry_run_model, tmp_path, capfd, monkeypatch):
    """As the README runs it: the recipe's config, K2_INIT_CKPT an HF model directory (its config.json, no
    weights), the data and save paths unset; megatron-core's warnings about the accelerators not shown."""
    from pathlib import Path

    import pretrain_sft

    report_file = tmp_path / "dry.json"
    monkeypatch.setenv("K2_INIT_CKPT", str(Path(dry_run_model).parent))
    for name in ("K2_DATA_PREFIX", "K2_SAVE_DIR"):
        monkeypatch.delenv(name, raising=False)
    recipe = Path(pretrain_sft.__file__).parent / "configs" / "k2think_qwen2.5_32b.yaml"
    arguments = [*_dry_run_arguments(None, report_file), "--config", str(recipe)]
    assert pretrain_sft.main(arguments) == 0
    report = json.loads(report_file.read_text())
    assert set(report) >= {"world_size", "gpu_memory_gb", "layout", "ranks", "fits"} and report["fits"]
    assert report["world_size"] == 16 and report["layout"]["data_parallel"] == 2
    assert [r["pipeline_stage"] for r in report["ranks"]] == [0, 1]
    for rank in report["ranks"]:
        assert set(rank["parts_gb"]) == {"weights", "grads", "optimizer", "activations", "logits", "other"}
        assert rank["peak_gb"] == pytest.approx(sum(rank["parts_gb"].values()), abs=0.01)
        assert rank["estimate_gb"] == pytest.approx(rank["peak_gb"], rel=0.12)
    assert report["ranks"][0]["parts_gb"]["logits"] == 0 < report["ranks"][1]["parts_gb"]["logits"]
    assert report["rows"].startswith("synthetic")
    out, err = capfd.readouterr()
    assert "every rank fits" in out
    assert "Transformer Engine and Apex are not installed" not in err and "warnings.warn" not in err
    # without the model's shape, the one variable it needs is named
    monkeypatch.delenv("K2_INIT_CKPT")
    assert pretrain_sft.main(arguments) == 2
    assert "the dry run needs the model's shape: model.init_checkpoint refers to ${K2_INIT_CKPT}" in (
        capfd.readouterr().err
    )


@pytest.mark.slow
def test_dry_run_fails_when_a_rank_does_not_fit(dry_run_model, tmp_path, capsys):
    import pretrain_sft

    report_file = tmp_path / "dry.json"
    # 6.01 GB less the 6 GB allowance leaves 10 MB, which neither rank fits in
    assert (
        pretrain_sft.main([*_dry_run_arguments(dry_run_model, report_file), "--gpu-memory-gb", "6.01"]) == 1
    )
    err = capsys.readouterr().err
    assert "rank 0 (pipeline stage 0) peaks at" in err and "rank 8 (pipeline stage 1)" in err
    assert not json.loads(report_file.read_text())["fits"]


@pytest.mark.slow
def test_rows_of_the_configured_data_cost_what_synthetic_rows_of_the_same_width_cost(dry_run_model, tmp_path):
    """With the data's files present the dry run runs its first step's rows (this data-parallel and
    context-parallel rank's share); the stand-ins keep per-token state only, so the peak equals that of
    the synthetic full-width rows within 0.5%."""
    from testing.synthetic_packs import packs_from_lengths, write_packed_dataset

    lengths = [300, 500, 200, 1000, 640, 380, *[100] * 10] * 4
    packs = packs_from_lengths(lengths, 1024, 4096, seed=0, pad_multiple=8)
    prefix = write_packed_dataset(tmp_path / "packs", packs, 1024, 4096, pad_multiple=8)
    layout = ["parallel.tensor=2", "parallel.context=2", "parallel.sequence_parallel=true"]
    with_data = load_config(
        None, [f"model.random_init_config={dry_run_model}", *TINY, *layout, f"data.prefixes=[{prefix}]"]
    )
    without = load_config(None, [f"model.random_init_config={dry_run_model}", *TINY, *layout])
    (data_plan,) = plan_ranks(with_data, 8)[1]
    (synthetic_plan,) = plan_ranks(without, 8)[1]
    assert data_plan.with_data and not synthetic_plan.with_data
    measured, synthetic = measure_in_one_process([data_plan, synthetic_plan])
    assert measured["rows"].startswith("the first step of") and synthetic["rows"].startswith("synthetic")
    assert measured["peak_bytes"] == pytest.approx(synthetic["peak_bytes"], rel=0.005)
    # packed for another layout: refused before anything is built
    coarse = write_packed_dataset(
        tmp_path / "coarse", packs_from_lengths(lengths, 1024, 4096, seed=0), 1024, 4096
    )
    with pytest.raises(ConfigError, match="pad-multiple"):
        plan_ranks(
            load_config(
                None,
                [f"model.random_init_config={dry_run_model}", *TINY, *layout, f"data.prefixes=[{coarse}]"],
            ),
            8,
        )
