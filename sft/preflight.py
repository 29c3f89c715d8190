"""Pre-flight: what a run reads and checks before any process group or model exists.

    inputs = check_run(config, world_size=256, device="cuda")     # the trainer's: data, weights, model
    shape = read_model_shape(config.model.init_checkpoint)         # the dry run's: the model's shape only
    check_configuration(config, 256, te_available=True, arch=shape.arch, check_paths=False)

Both the trainer (sft/trainer.py, pretrain_sft.py) and the dry run (sft/dry_run/) go through here, so a
configuration is judged the same way by both: every problem found is reported at once
(`ConfigError.listing`), each naming the key and the fix; a problem with the data's content is a
DataError naming the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError, DataError
from formats.chat_template import TEMPLATES
from formats.run_files import TOKENIZER_DIR
from formats.torch_dist import verify_checkpoint
from models.backends import te_available
from models.hf_config import find_hf_config
from models.registry import Arch, family_of, read_arch

from .checkpointing import check_resumable, find_resume_checkpoint
from .config import ScheduleConfig, TrainConfig
from .data import SFTData, ValidationData, default_valid_prefixes, layout_problems
from .train_module import warmup_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """The model a source describes: a converted checkpoint, an HF model directory or its config.json."""

    hf_config_file: Path  # the architecture, copied into every checkpoint
    arch: Arch
    tokenizer_dir: Path | None  # the tokenizer a converted checkpoint carries (copied along), if any


@dataclass
class RunInputs:
    """What a run reads before any process group or model exists, checked against the configuration."""

    data: SFTData
    shape: ModelShape
    resume_from: Path | None
    train_iters: int
    valid: ValidationData | None = None  # the held-out packs, when there are any

    @property
    def arch(self) -> Arch:
        return self.shape.arch


def read_model_shape(source: str | Path) -> ModelShape:
    """The architecture `source` describes (no weights are read)."""
    hf_config_file = find_hf_config(source)
    tokenizer = Path(source) / TOKENIZER_DIR
    return ModelShape(hf_config_file, read_arch(hf_config_file), tokenizer if tokenizer.is_dir() else None)


def check_configuration(
    config: TrainConfig,
    world_size: int,
    *,
    te_available: bool,
    arch: Arch | None,
    data: SFTData | None = None,
    valid: ValidationData | None = None,
    check_paths: bool = True,
) -> None:
    """One ConfigError listing every problem of `config` for a run of `world_size` processes: its own,
    against the model's architecture, and those of the data's packs (and the held-out ones) with the
    layout."""
    problems = config.run_problems(
        world_size=world_size,
        te_available=te_available,
        arch=arch,
        data_seq_length=None if data is None else data.seq_length,
        check_paths=check_paths,
    )
    if data is not None:
        problems += data.layout_problems(config.parallel)
    if valid is not None:
        problems += layout_problems(valid.datasets, config.parallel)
    if problems:
        raise ConfigError.listing(problems)


def check_run(config: TrainConfig, world_size: int, device: str) -> RunInputs:
    """Opens the data and the starting checkpoint and validates the configuration against them and the
    world size; raises ConfigError (listing every problem) or DataError before anything heavy starts."""
    config.check_files(world_size)  # before a missing file is opened (and reported alone)
    data = SFTData(config.data.prefixes, config.data.weights, config.data.seed)
    valid = validation_data(config, data.seq_length)
    resume_from = find_resume_checkpoint(config.checkpoint.resume, config.checkpoint.save_dir)
    source = resume_from or config.model.init_checkpoint or config.model.random_init_config
    if source is None:
        raise ConfigError(
            f"nothing to start from: checkpoint.save_dir={config.checkpoint.save_dir} holds no checkpoint "
            "to resume and model.init_checkpoint is not set (convert the HF weights with "
            "tools/convert_hf_to_mcore.py and set model.init_checkpoint=DIR)"
        )
    if resume_from is None and config.model.init_checkpoint:
        verify_checkpoint(config.model.init_checkpoint)  # resume_from was verified when it was chosen
    if resume_from is not None:
        check_resumable(resume_from, config.parallel)
    shape = read_model_shape(source)
    check_configuration(
        config,
        world_size,
        te_available=te_available(device),
        arch=shape.arch,
        data=data,
        valid=valid,
        check_paths=False,  # done above
    )
    check_data_fits_model(data, shape.arch)
    return RunInputs(data, shape, resume_from, train_iterations(config.schedule, data), valid)


def check_data_fits_model(data: SFTData, arch: Arch) -> None:
    """The data's chat template must be one written in the model's special tokens (a name this project
    does not know, as synthetic test data's, cannot be checked: it is logged), and its token ids must be
    the model's."""
    family = family_of(arch)
    if data.chat_template not in TEMPLATES:
        log.warning("the data's chat template %r is none this project knows: not checked", data.chat_template)
    elif data.chat_template not in family.chat_templates:
        raise DataError(
            f"{data.datasets[0].prefix}: the data was encoded with the {data.chat_template} chat template, "
            f"which a {family.name} model does not speak: re-run tools/preprocess_sft.py with --template "
            f"{' or '.join(family.chat_templates)} and this model's tokenizer"
        )
    for dataset in data.datasets:
        if dataset.vocab_size > arch.vocab_size:
            raise DataError(
                f"{dataset.prefix}: the tokenizer has {dataset.vocab_size} tokens, the model's vocabulary "
                f"only {arch.vocab_size}: the data was tokenised for another model"
            )


def schedule_summary(train_iters: int, global_batch_size: int, packs: int) -> str:
    """The run's length as trained: its epochs are those its iterations make (schedule.train_iters may
    differ from schedule.epochs' count)."""
    epochs = train_iters * global_batch_size / packs
    return f"{train_iters} iterations of {global_batch_size} packs ({epochs:.3g} epochs over {packs} packs)"


def train_iterations(schedule: ScheduleConfig, data: SFTData) -> int:
    """The run's optimizer steps (schedule.train_iters, or the epochs over the data); a ConfigError when
    they are too few to train, naming the cause: a global batch larger than the data, or the warm-up."""
    packs = data.order.epoch_size
    train_iters = schedule.train_iters or data.iterations(schedule.epochs, schedule.global_batch_size)
    if schedule.train_iters is None and packs < schedule.global_batch_size:
        if train_iters < 1 or warmup_steps(schedule.warmup_ratio, train_iters) >= train_iters:
            raise ConfigError(
                f"schedule.global_batch_size={schedule.global_batch_size} packs is larger than the data's "
                f"{packs} packs, so {schedule.epochs} epochs make {train_iters} optimizer step(s), too few "
                f"to warm up and decay: lower schedule.global_batch_size (at most {packs}: one step per "
                "epoch), set schedule.train_iters (the data repeats), or train on more data"
            )
    if warmup_steps(schedule.warmup_ratio, train_iters) >= train_iters:
        raise ConfigError(
            f"schedule.warmup_ratio={schedule.warmup_ratio} of {train_iters} iteration(s) is "
            f"{warmup_steps(schedule.warmup_ratio, train_iters)} warm-up step(s), which leaves no step "
            "to decay over: lower schedule.warmup_ratio (0 for a run this short) or train longer"
        )
    return train_iters


def validation_data(config: TrainConfig, seq_length: int) -> ValidationData | None:
    """The held-out packs: data.valid_prefixes, or those tools/preprocess_sft.py wrote beside the
    training data (--valid-fraction); None when there are none."""
    prefixes = config.data.valid_prefixes
    if prefixes is None:
        prefixes = default_valid_prefixes(config.data.prefixes)
        if prefixes:
            log.info("validation data: %s (found next to data.prefixes)", ", ".join(prefixes))
    if not prefixes:
        log.info("no validation data (data.valid_prefixes; tools/preprocess_sft.py --valid-fraction)")
        return None
    return ValidationData(prefixes, seq_length, config.eval.max_packs)
