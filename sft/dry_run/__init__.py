"""The dry run: each rank's GPU memory, measured on a CPU before the job starts.

    python pretrain_sft.py --config configs/k2think_qwen2.5_32b.yaml --dry-run --gpus 256

For the first and the last pipeline stage (one rank each; the only one at PP = 1), a process builds what
the real run builds for that rank (sft/train_module.py: the model, megatron-core's DDP, distributed
optimizer and pipeline schedule) on torch's fake tensors, with megatron-core's process groups on torch's
`fake` process-group backend of the job's full world size, and runs two iterations (forward, backward,
optimizer step: the second one holds the Adam moments). Nothing is allocated; `tracker.MemoryTracker`
adds up the storages that would be, by part, and keeps the peak. The cluster's fused kernels are stood
in for (kernels.py, which lists what each keeps). The figures leave out what fake tensors cannot see:
the CUDA context, NCCL's buffers and the allocator's fragmentation, for which `ALLOWANCE_GB` is kept
free of the device's memory.

The model's shape comes from model.init_checkpoint (a converted checkpoint, an HF model directory or its
config.json; no weights are read) or model.random_init_config; the data and save paths need not be set
(an environment variable they refer to may be unset). The rows are those of the configured data when its
files exist here, otherwise full-width rows of
4,000-token conversations (the stand-ins keep per-token state only, so the lengths do not change the
figures). The micro-batches run per step are min(the step's, 2 x PP x VP), which reaches the 1F1B
schedule's steady state and so its peak.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, DataError
from common.logging_utils import quiet_dependencies
from models.registry import Arch
from plan.layout import ParallelLayout
from plan.planner import BUFFER_ALLOWANCE_GB, Hardware, estimate, recompute_mode

from ..config import TrainConfig, describe_unset, unset_variables
from ..preflight import check_configuration, read_model_shape

log = logging.getLogger(__name__)

GB = 1e9
ALLOWANCE_GB = BUFFER_ALLOWANCE_GB
SYNTHETIC_CONVERSATION = 4000  # tokens per conversation of the synthetic rows
ITERATIONS = 2


@dataclass(frozen=True)
class RankPlan:
    """What one measured rank runs: everything a spawned process needs, picklable."""

    rank: int
    world_size: int
    pipeline_stage: int
    stage_name: str  # the planner's: first, last or only
    config: TrainConfig
    hf_config_file: str
    micro_batches: int  # per iteration, as run
    step_micro_batches: int  # per iteration in the real run
    with_data: bool  # rows from the configured data (else synthetic ones)


def measured_ranks(layout: ParallelLayout, world_size: int) -> list[tuple[int, int, str]]:
    """(global rank, pipeline stage, planner stage name) of the first rank of the first and the last
    pipeline stage: megatron-core's rank order puts the pipeline outermost."""
    if layout.pipeline == 1:
        return [(0, 0, "only")]
    per_stage = world_size // layout.pipeline
    return [(0, 0, "first"), ((layout.pipeline - 1) * per_stage, layout.pipeline - 1, "last")]


def plan_ranks(config: TrainConfig, world_size: int) -> tuple[Arch, list[RankPlan]]:
    """Checks the configuration for `world_size` GPUs with Transformer Engine (the cluster's path) and
    lays out the measured ranks; raises ConfigError."""
    config = _without_unset_paths(config)
    shape = read_model_shape(config.model.init_checkpoint or config.model.random_init_config)
    data = _open_data(config)
    check_configuration(config, world_size, te_available=True, arch=shape.arch, data=data, check_paths=False)
    layout = config.parallel
    step = layout.micro_batches_per_step(config.schedule.global_batch_size, world_size)
    run = min(step, 2 * layout.pipeline * layout.virtual_stages)
    plans = [
        RankPlan(
            rank, world_size, stage, name, config, str(shape.hf_config_file), run, step, data is not None
        )
        for rank, stage, name in measured_ranks(layout, world_size)
    ]
    return shape.arch, plans


MODEL_SHAPE_SOURCES = (
    "a Hugging Face model directory (its config.json is read, no weights), that config.json, or a converted "
    "checkpoint"
)


def _without_unset_paths(config: TrainConfig) -> TrainConfig:
    """The configuration the dry run measures: it needs the model's shape, and neither the data (without
    it, synthetic rows) nor any other path, so environment variables those refer to may be unset."""
    model = config.model
    key = "model.init_checkpoint" if model.init_checkpoint else "model.random_init_config"
    source = model.init_checkpoint or model.random_init_config
    if not source:
        raise ConfigError(
            f"the dry run needs the model's shape: set model.init_checkpoint to {MODEL_SHAPE_SOURCES}"
        )
    unset = unset_variables(config)
    for name, keys in unset.items():
        if key in keys:
            raise ConfigError(
                f"the dry run needs the model's shape: {key} refers to ${{{name}}}, which is not set: export "
                f"{name}=PATH, {MODEL_SHAPE_SOURCES} (or override {key}=PATH)"
            )
    if any("data.prefixes" in keys for keys in unset.values()):  # synthetic rows
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, prefixes=[], weights=None))
    if unset:
        log.info("not set, and not needed by the dry run: %s", describe_unset(unset))
    return config


def _open_data(config: TrainConfig):
    """The configured data when its files are here (a login node may not see the cluster's storage)."""
    from ..data import SFTData

    if not config.data.prefixes:
        return None
    try:
        return SFTData(config.data.prefixes, config.data.weights, config.data.seed)
    except DataError as exc:
        log.warning("the dry run uses synthetic rows: %s", exc)
        return None


def dry_run(config: TrainConfig, world_size: int, gpu_memory_gb: float = 80.0, processes: int = 2) -> dict:
    """Measures the ranks of `plan_ranks` (`processes` at a time) and returns the report (`report_json`)."""
    from .rank import measure_rank

    arch, plans = plan_ranks(config, world_size)
    log.info(
        "Transformer Engine and apex are not needed here: the dry run stands in for the cluster's kernels "
        "(listed below)"
    )
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        min(processes, len(plans)),
        mp_context=context,
        max_tasks_per_child=1,
        initializer=quiet_dependencies,  # before megatron-core's import warns of the missing accelerators
    ) as pool:
        measured = list(pool.map(measure_rank, plans))
    return report_json(config, arch, plans, measured, world_size, gpu_memory_gb)


def planner_estimate(config: TrainConfig, arch: Arch, world_size: int, gpu_memory_gb: float):
    """The planner's estimate for the configured layout, per stage, without its buffer allowance; None
    for a recomputation the planner does not model (a mix of modules, or the norms)."""
    recompute = recompute_mode(config.model.recompute, config.model.recompute_modules)
    if recompute is None:
        return None
    hw = Hardware(gpus=world_size, gpu_memory_gb=gpu_memory_gb, buffer_gb=0.0)
    found = estimate(
        arch,
        config.parallel,
        recompute,
        hw,
        config.data.seq_length,
        config.schedule.global_batch_size,
        SYNTHETIC_CONVERSATION,
        weight_bytes=4 if config.model.precision == "fp32" else 2,
    )
    return None if found is None else found.stage_memory_gb


def report_json(config, arch, plans, measured, world_size: int, gpu_memory_gb: float) -> dict:
    estimates = planner_estimate(config, arch, world_size, gpu_memory_gb) or {}
    usable = gpu_memory_gb - sum(ALLOWANCE_GB.values())
    ranks = []
    for plan, result in zip(plans, measured, strict=True):
        stage = estimates.get(plan.stage_name)
        ranks.append(
            {
                "rank": plan.rank,
                "pipeline_stage": plan.pipeline_stage,
                "peak_gb": round(result["peak_bytes"] / GB, 3),
                "parts_gb": {name: round(value / GB, 3) for name, value in result["parts"].items()},
                "estimate_gb": None if stage is None else round(sum(stage.values()), 3),
                "estimate_parts_gb": stage,
                "micro_batches": {"run": plan.micro_batches, "per_step": plan.step_micro_batches},
                "seconds": round(result["seconds"], 1),
                "host_peak_gb": round(result["host_peak_bytes"] / GB, 3),
            }
        )
    layout = config.parallel
    return {
        "world_size": world_size,
        "gpu_memory_gb": gpu_memory_gb,
        "allowance_gb": ALLOWANCE_GB,
        "usable_gb": usable,
        "layout": {
            **dataclasses.asdict(layout),
            "data_parallel": layout.data_parallel(world_size),
            "recompute": config.model.recompute,
            "recompute_modules": config.model.recompute_modules,
        },
        "rows": measured[0]["rows"],
        "stand_ins": measured[0]["stand_ins"],
        "notes": _notes(config),
        "ranks": ranks,
        "fits": all(r["peak_gb"] <= usable for r in ranks),
    }


def _notes(config: TrainConfig) -> list[str]:
    notes = []
    if "layernorm" in (config.model.recompute_modules or []):
        # seen on the tiny model: on real tensors the norms' recomputation frees its outputs sooner
        notes.append(
            "with the norms' recomputation the figures are an upper bound: on fake tensors megatron-core's "
            "restored norm outputs are counted until the step frees them"
        )
    return notes


def format_report(report: dict) -> str:
    """The report as a table, one line per measured rank, and the verdict."""
    lines = [
        f"dry run: {report['world_size']} GPUs, layout "
        + ", ".join(f"{k}={v}" for k, v in report["layout"].items() if v is not None),
        f"rows: {report['rows']}",
        "stood in for: " + "; ".join(report["stand_ins"]),
        *(f"note: {note}" for note in report["notes"]),
        f"{'rank':>5} {'stage':>5} | {'weights':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'logits':>6} "
        f"{'other':>6} | {'peak':>6} {'planner':>7} GB",
    ]
    for r in report["ranks"]:
        parts = r["parts_gb"]
        estimate_text = "-" if r["estimate_gb"] is None else f"{r['estimate_gb']:.1f}"
        lines.append(
            f"{r['rank']:>5} {r['pipeline_stage']:>5} | {parts['weights']:>7.1f} {parts['grads']:>6.1f} "
            f"{parts['optimizer']:>6.1f} {parts['activations']:>6.1f} {parts['logits']:>6.1f} "
            f"{parts['other']:>6.1f} | "
            f"{r['peak_gb']:>6.1f} {estimate_text:>7}"
        )
    allowance = ", ".join(f"{name} {value:g}" for name, value in report["allowance_gb"].items())
    lines.append(
        f"device {report['gpu_memory_gb']:g} GB less {sum(report['allowance_gb'].values()):g} GB not seen "
        f"by fake tensors ({allowance}) = {report['usable_gb']:g} GB usable: "
        + ("every rank fits" if report["fits"] else "DOES NOT FIT")
    )
    return "\n".join(lines)


def misfits(report: dict) -> list[str]:
    """One message per rank that does not fit, naming the rank, its peak and the device's memory."""
    return [
        f"rank {r['rank']} (pipeline stage {r['pipeline_stage']}) peaks at {r['peak_gb']:.3g} GB, over the "
        f"{report['usable_gb']:g} GB usable of {report['gpu_memory_gb']:g} GB: choose another layout "
        "(tools/plan_layout.py), more recomputation (model.recompute) or more GPUs"
        for r in report["ranks"]
        if r["peak_gb"] > report["usable_gb"]
    ]


def run_dry_run(
    config: TrainConfig, world_size: int, gpu_memory_gb: float, json_path: Path | None = None
) -> int:
    """The body of `pretrain_sft.py --dry-run`: the table on stdout, the JSON to `json_path`, and exit
    status 1 (with one line per rank on stderr) when a rank would not fit."""
    import sys

    from common.files import write_json_atomic

    if world_size < 1:
        raise ConfigError(f"--gpus must be >= 1 (got {world_size}): the job's number of GPUs")
    report = dry_run(config, world_size, gpu_memory_gb)
    print(format_report(report))
    if json_path is not None:
        write_json_atomic(json_path, report)
    for message in misfits(report):
        print(f"error: {message}", file=sys.stderr)
    return 0 if report["fits"] else 1
