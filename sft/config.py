"""The trainer's configuration: one typed tree, loaded from YAML with dotted command-line overrides,
validated before any process group or model is built.

    config = load_config("configs/k2think_qwen2.5_32b.yaml", ["parallel.tensor=4", "data.prefixes=[/d/am]"])
    config.validate(world_size=256, te_available=True, arch=arch, data_seq_length=32768)

Defaults are the K2-Think recipe's (docs/architecture.md): lr 1e-4 cosine to 0 after a 5% warm-up,
AdamW (0.9, 0.999, eps 1e-8, no weight decay), clip 1.0, 2 epochs, global batch 512 packs of 32768
tokens. Every validation error names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common.errors import ConfigError
from formats.packed import PackedPaths
from formats.run_files import HF_CONFIG_FILE
from models.hf_config import HF_CONFIG_NAME
from plan.layout import ParallelLayout

from .watchdog import WatchdogConfig

# megatron-core's modules to recompute: mlp is a dense model's MLP, moe a mixture of experts' whole layer
RECOMPUTE_MODULES = {"core_attn", "mlp", "moe", "layernorm"}


@dataclass
class ModelConfig:
    # torch_dist from tools/convert_hf_to_mcore.py (architecture from its hf_config.json); the dry run
    # reads only the shape, so an HF model directory or its config.json serves it too
    init_checkpoint: str | None = None
    # instead of init_checkpoint: random weights of the architecture in this HF config.json (benchmarks)
    random_init_config: str | None = None
    # activation recomputation: none; selective (the modules below); full (every layer re-run in the backward)
    recompute: Literal["none", "selective", "full"] = "selective"
    # with selective: megatron-core's modules to recompute (core_attn, mlp, moe: a mixture of experts' layer,
    # layernorm); null = core_attn
    recompute_modules: list[str] | None = None
    attention: Literal["auto", "te", "torch"] = "auto"  # auto: Transformer Engine when importable on CUDA
    # weights and activations: bf16 (megatron-core's Float16Module, fp32 main weights and gradients in the
    # distributed optimizer) or fp32; auto: bf16 on CUDA, fp32 on a CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # a mixture of experts: how tokens reach the experts on other expert-parallel ranks (megatron-core's
    # token dispatchers): alltoall sends each token only where it is routed, allgather gathers every token
    # to every expert-parallel rank
    moe_dispatcher: Literal["alltoall", "allgather"] = "alltoall"
    # a mixture of experts: the weight of megatron-core's load-balancing loss (0: off, as LLaMA-Factory
    # trains Qwen3 MoE unless told). Per layer and micro-batch it is coef x E x sum_e f_e P_e with f_e the
    # share of the k x T routings that chose expert e and P_e its mean probability, summed over layers:
    # transformers' Qwen3-MoE loss is k times one layer's and pools all layers' tokens instead
    moe_aux_loss_coef: float = 0.0

    def problems(self) -> list[str]:
        problems = []
        if self.moe_aux_loss_coef < 0:
            problems.append(f"model.moe_aux_loss_coef={self.moe_aux_loss_coef} must be >= 0 (0: off)")
        if self.init_checkpoint and self.random_init_config:
            problems.append("model.init_checkpoint and model.random_init_config are both set: choose one")
        if self.random_init_config and not Path(self.random_init_config).is_file():
            problems.append(
                f"model.random_init_config={self.random_init_config} is not a file (an HF config.json)"
            )
        if self.recompute_modules is not None and self.recompute != "selective":
            problems.append("model.recompute_modules applies to model.recompute=selective only")
        unknown = set(self.recompute_modules or []) - RECOMPUTE_MODULES
        if unknown:
            problems.append(
                f"model.recompute_modules: {sorted(unknown)} unknown; choose from {sorted(RECOMPUTE_MODULES)}"
            )
        return problems

    def path_problems(self) -> list[str]:
        """The starting checkpoint, checked apart: the dry run reads only the model's shape, which an HF
        model directory or its config.json gives too."""
        checkpoint = self.init_checkpoint
        if not checkpoint or (Path(checkpoint) / HF_CONFIG_FILE).is_file():
            return []
        if (Path(checkpoint) / HF_CONFIG_NAME).is_file():
            return [
                f"model.init_checkpoint={checkpoint} is a Hugging Face model, not a converted checkpoint: "
                f"convert it first (tools/convert_hf_to_mcore.py --hf {checkpoint} --out CKPT) and set "
                "model.init_checkpoint=CKPT"
            ]
        return [
            f"model.init_checkpoint={checkpoint} is not a converted checkpoint (no {HF_CONFIG_FILE}): "
            "run tools/convert_hf_to_mcore.py"
        ]


@dataclass
class DataConfig:
    prefixes: list[str] = field(default_factory=list)  # PREFIX of PREFIX_input_ids.{bin,idx} etc.
    weights: list[float] | None = None  # relative sampling weights of several prefixes
    seq_length: int = 32768  # tokens per pack, as packed by preprocess_sft.py --seq-length
    seed: int = 1234  # order of packs; a different permutation per epoch
    prefetch: bool = True  # prepare the next step's micro-batches in a background thread
    # held-out packed datasets for the validation loss; null: PREFIX_valid next to each training prefix
    # where preprocess_sft.py --valid-fraction wrote one; [] = no validation
    valid_prefixes: list[str] | None = None

    def problems(self) -> list[str]:
        if self.weights is not None and (len(self.weights) != len(self.prefixes) or min(self.weights) <= 0):
            return ["data.weights needs one positive weight per prefix"]
        return []

    def path_problems(self) -> list[str]:
        """The files the run reads, checked apart: the dry run may not see them."""
        problems = []
        if not self.prefixes:
            problems.append(
                "data.prefixes is empty: set data.prefixes=[PREFIX] "
                "(the --output-prefix of preprocess_sft.py)"
            )
        for prefix in self.prefixes:
            missing = [path for path in PackedPaths(prefix).all_files() if not path.is_file()]
            if missing:
                problems.append(f"data.prefixes: {missing[0]} not found (run tools/preprocess_sft.py first)")
        for prefix in self.valid_prefixes or []:
            missing = [path for path in PackedPaths(prefix).all_files() if not path.is_file()]
            if missing:
                problems.append(
                    f"data.valid_prefixes: {missing[0]} not found (tools/preprocess_sft.py --valid-fraction "
                    "writes PREFIX_valid)"
                )
        return problems


@dataclass
class OptimizerConfig:
    lr: float = 1e-4  # peak learning rate, reached after the warm-up
    min_lr: float = 0.0  # the cosine decay's end
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's epsilon
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    clip_grad: float = 1.0  # global gradient-norm clipping threshold

    def problems(self) -> list[str]:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            return ["optimizer.lr must be > 0 and 0 <= optimizer.min_lr <= optimizer.lr"]
        return []


@dataclass
class LossConfig:
    # global_token: every trained token of a step weighs the same (megatron-core's per-token loss);
    # per_group: the recipe's weighting: the mean over groups of group_size consecutive packs of the
    # global batch of each group's per-token mean (HF Trainer's loss per GPU, averaged over GPUs)
    normalization: Literal["global_token", "per_group"] = "global_token"
    group_size: int = 2  # packs per group with per_group: the recipe's 2 packs per GPU

    def problems(self) -> list[str]:
        if self.normalization == "per_group" and self.group_size < 1:
            return [f"loss.group_size={self.group_size} must be >= 1"]
        return []


@dataclass
class ScheduleConfig:
    epochs: int = 2  # passes over the packs
    global_batch_size: int = 512  # packs per optimizer step
    warmup_ratio: float = 0.05  # linear warm-up over ceil(ratio x iterations), then cosine
    train_iters: int | None = None  # default: from packs, epochs and global batch
    max_consecutive_nonfinite: int = 5  # skipped steps in a row before the run aborts

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"schedule.warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        for name in ("epochs", "global_batch_size", "max_consecutive_nonfinite"):
            if getattr(self, name) < 1:
                problems.append(f"schedule.{name} must be >= 1")
        return problems


@dataclass
class CheckpointConfig:
    save_dir: str | None = None  # checkpoints (iter_NNNNNNN), metrics and the finished marker
    save_interval: int = 500  # iterations between checkpoints
    keep_last_n: int | None = 3  # complete checkpoints kept (older ones deleted); null = all
    resume: str = "auto"  # auto: latest complete checkpoint in save_dir, if any; none; or a path
    save_at_end: bool = True  # off only for throughput measurements (bench/gpu/stage_throughput.py)
    # write the tensors in a background process once they are in host memory: training goes on, and
    # iter_N.partial becomes iter_N when every rank has finished (checked between iterations)
    async_save: bool = False
    # data/context-parallel replicas of a tensor share its writing instead of one of them writing it all
    fully_parallel_save: bool = True
    # the same for reading (resume and model.init_checkpoint): each replica reads a share, then broadcasts
    fully_parallel_load: bool = False
    # the optimizer state per parameter (megatron-core's fully_reshardable format) instead of per
    # data-parallel shard: the run can then resume at another tensor/pipeline/expert layout; each save
    # gathers a data-parallel group's optimizer state (12 bytes per parameter of its model-parallel
    # share) into the host memory of the group's first rank, which writes it, and a resume reads that
    # share whole on every rank. Off: a resume may change the data/context-parallel sizes only
    reshardable_optimizer: bool = False

    def problems(self) -> list[str]:
        problems = []
        if self.keep_last_n is not None and self.keep_last_n < 1:
            problems.append("checkpoint.keep_last_n must be >= 1, or null to keep every checkpoint")
        if self.save_interval < 1:
            problems.append("checkpoint.save_interval must be >= 1")
        return problems

    def path_problems(self) -> list[str]:
        if self.save_dir is None:
            return ["checkpoint.save_dir is not set: where should checkpoints and metrics go?"]
        return []


@dataclass
class EvalConfig:
    interval: int = 0  # iterations between validation losses; 0 = only at the end (always evaluated there)
    max_packs: int | None = None  # evaluate the first N held-out packs; null = all of them

    def problems(self) -> list[str]:
        problems = []
        if self.interval < 0:
            problems.append("eval.interval must be >= 0 (0: evaluate only at the end)")
        if self.max_packs is not None and self.max_packs < 1:
            problems.append("eval.max_packs must be >= 1, or null for every held-out pack")
        return problems


@dataclass
class LoggingConfig:
    log_interval: int = 1  # iterations between metric records (console, JSONL, TensorBoard, wandb)
    metrics_file: str | None = None  # JSONL; default SAVE_DIR/metrics.jsonl
    wandb_mode: Literal["online", "offline", "disabled"] = "disabled"  # online needs WANDB_API_KEY
    wandb_project: str = "k2think-sft"  # the wandb project
    wandb_run_name: str | None = None  # default: wandb's own name
    tensorboard: bool = True  # event files with the same scalars as wandb, in SAVE_DIR/tensorboard
    tensorboard_dir: str | None = None  # instead of SAVE_DIR/tensorboard
    plot: bool = True  # SAVE_DIR/metrics.png (tools/plot_metrics.py) at the end of the run
    # MFU's denominator, TFLOP/s; null: the datasheet dense bf16 peak of the GPU found (common/devices.py),
    # the H100 SXM's on a CPU or an unlisted GPU
    peak_tflops_per_device: float | None = None


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)  # sft/watchdog.py: hung steps
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA when available
    seed: int = 1234  # weight initialisation and megatron-core's RNG
    # process-group (NCCL/gloo) timeout: well above the longest checkpoint save or load of the run
    timeout_minutes: int = 60

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    SECTIONS = ("model", "data", "optimizer", "schedule", "loss", "checkpoint", "eval", "watchdog")

    def problems(self, check_paths: bool = True) -> list[str]:
        """Each section's own problems, then those between sections (the layout is checked apart, against
        the world size: `validate`)."""
        problems = [problem for name in self.SECTIONS for problem in getattr(self, name).problems()]
        if check_paths:
            problems += self.path_problems()
        if self.loss.normalization == "per_group" and self.schedule.global_batch_size % max(
            self.loss.group_size, 1
        ):
            problems.append(
                f"loss.group_size={self.loss.group_size} must divide schedule.global_batch_size="
                f"{self.schedule.global_batch_size} (groups are consecutive packs of the global batch)"
            )
        model = self.model
        if not (model.init_checkpoint or model.random_init_config) and self.checkpoint.resume == "none":
            problems.append(
                "model.init_checkpoint is not set and checkpoint.resume=none: nothing to start from"
            )
        if self.timeout_minutes < 1:
            problems.append("timeout_minutes must be >= 1 (the process-group timeout; default 60)")
        return problems

    def path_problems(self) -> list[str]:
        """The files and directories the run reads or writes, checked before any is opened."""
        return [*self.model.path_problems(), *self.data.path_problems(), *self.checkpoint.path_problems()]

    def run_problems(
        self,
        *,
        world_size: int,
        te_available: bool | None,
        arch=None,
        data_seq_length: int | None = None,
        check_paths: bool = True,
    ) -> list[str]:
        """Every problem of the configuration for a run of `world_size` processes: the sections', the
        layout's, the kernels' (`te_available`; None: not known yet, not checked), and, when given,
        against the model's architecture (from
        models/registry.py) and the data's sequence length; without `check_paths`, the data files, the save
        directory and the starting checkpoint are not asked for (the dry run, on a machine that may not
        see them, reads the model's shape from any of find_hf_config's sources)."""
        problems = self.problems(check_paths) + self.parallel.problems(
            world_size=world_size,
            arch=arch,
            global_batch=self.schedule.global_batch_size,
            seq_length=self.data.seq_length,
        )
        if te_available is False and "layernorm" in (self.model.recompute_modules or []):
            problems.append(
                "model.recompute_modules=[layernorm] needs Transformer Engine (megatron-core's norm "
                "recomputation goes through TE's FP8 state): recompute core_attn or mlp here"
            )
        if te_available is False and self.model.attention == "te":
            problems.append(
                "model.attention=te needs Transformer Engine, which is not importable here "
                "(install it, or use model.attention=auto)"
            )
        if arch is not None:
            problems += _expert_problems(self.model, getattr(arch, "moe", None) is not None)
        if arch is not None and self.data.seq_length > arch.max_position_embeddings:
            problems.append(
                f"data.seq_length={self.data.seq_length} exceeds the model's max_position_embeddings "
                f"({arch.max_position_embeddings})"
            )
        if data_seq_length is not None and data_seq_length != self.data.seq_length:
            problems.append(
                f"data.seq_length={self.data.seq_length} but the data was packed at {data_seq_length}: "
                f"re-pack it at {self.data.seq_length} (tools/preprocess_sft.py --seq-length "
                f"{self.data.seq_length}: every micro-batch row is one pack wide, so on a CPU the shorter "
                f"packs are the affordable ones), or train at data.seq_length={data_seq_length}"
            )
        return problems

    def check_files(self, world_size: int) -> None:
        """Raises ConfigError when a file the run reads is missing (or the save directory is unset),
        listing every problem found so far. Needs neither torch nor megatron-core: pretrain_sft.py calls
        it before importing them, so that such a job fails on every rank at once, not after the imports;
        the kernels' problems wait for the full check (sft/preflight.py)."""
        if self.path_problems():
            raise ConfigError.listing(self.run_problems(world_size=world_size, te_available=None))

    def validate(self, **run: Any) -> None:
        """Raises ConfigError listing every problem `run_problems(**run)` finds."""
        problems = self.run_problems(**run)
        if problems:
            raise ConfigError.listing(problems)


def _expert_problems(model: ModelConfig, experts: bool) -> list[str]:
    """The model settings that apply to a mixture of experts only, or to a dense model only."""
    problems = []
    modules = set(model.recompute_modules or [])
    wrong = "mlp" if experts else "moe"
    if wrong in modules:
        right = "moe" if experts else "mlp"
        problems.append(
            f"model.recompute_modules: {wrong} does not apply to this model; mlp recomputes a dense model's "
            f"MLP, moe a mixture of experts' layer: use {right}"
        )
    if not experts and model.moe_aux_loss_coef:
        problems.append("model.moe_aux_loss_coef applies to a mixture-of-experts model only: set it to 0")
    return problems


# Loading ---------------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), *, allow_unset: bool = False
) -> TrainConfig:
    """The defaults, updated by the YAML file at `path`, then by `key.sub=value` overrides (values in
    YAML syntax: `parallel.tensor=8`, `data.prefixes=[/data/a,/data/b]`, `data.weights=null`).

    `${NAME}` in a string value is the environment variable NAME. An unset one is an error naming every
    unset variable and its key, unless `allow_unset`: then the value keeps `${NAME}` as written
    (`unset_variables` lists them), for `--print-config` and the dry run, which need no paths."""
    values: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            shipped = sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
            raise ConfigError(
                f"{path}: no such config file (the shipped ones: configs/{', configs/'.join(shipped)})"
            )
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        values = loaded
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {override!r}: expected key.sub=value")
        node = values
        *parents, leaf = key.split(".")
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {name} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    expanded = _expand_environment(values)
    unset = _references(expanded)
    if unset and not allow_unset:
        raise ConfigError(
            f"the configuration refers to environment variables that are not set: {describe_unset(unset)}. "
            "Export them, or override those keys on the command line (KEY=VALUE)"
        )
    return _build(TrainConfig, expanded, "")


_ENV_REFERENCE = re.compile(r"\$\{(\w+)\}")


def _expand_environment(value):
    """`${NAME}` in string values is replaced by the environment variable NAME, so configs in configs/
    take paths from the environment, never from edits; an unset one stays as written."""
    if isinstance(value, dict):
        return {k: _expand_environment(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_environment(v) for v in value]
    if isinstance(value, str):
        return _ENV_REFERENCE.sub(lambda match: os.environ.get(match.group(1), match.group(0)), value)
    return value


def unset_variables(config: TrainConfig) -> dict[str, list[str]]:
    """The environment variables the configuration's values still refer to (unset when it was loaded
    with `allow_unset`), each with the keys that name it, in the tree's order."""
    return _references(config.to_dict())


def describe_unset(unset: dict[str, list[str]]) -> str:
    """`unset_variables`' answer as messages name it: NAME (key, key), ..."""
    return ", ".join(f"{name} ({', '.join(keys)})" for name, keys in unset.items())


def _references(tree: dict[str, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}

    def visit(value, key: str) -> None:
        if isinstance(value, dict):
            for name, inner in value.items():
                visit(inner, f"{key}.{name}" if key else name)
        elif isinstance(value, list):
            for inner in value:
                visit(inner, key)
        elif isinstance(value, str):
            for name in _ENV_REFERENCE.findall(value):
                keys = found.setdefault(name, [])
                if key not in keys:
                    keys.append(key)

    visit(tree, "")
    return found


def _build(cls, values: dict[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]}; valid keys here: {', '.join(sorted(names))}")
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in values.items()}
    return cls(**kwargs)


def _coerce(hint, value, where: str):
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} is a section; give it as a mapping of keys")
        return _build(hint, value, where + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r}; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, e.g. [a, b]")
        return [_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 3e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}={value!r} must be of type {hint.__name__}")
    return value


def dump_config(config: TrainConfig) -> str:
    """The resolved configuration as YAML (printed at start, logged to wandb, stored with checkpoints);
    `load_config` of it gives the same configuration back."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
