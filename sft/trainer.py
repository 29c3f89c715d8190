"""The SFT trainer on megatron-core: the checks before a run, and the training loop.

Started once per process by pretrain_sft.py (torchrun / Slurm), or in each rank of run_distributed (tests):

    trainer = Trainer(config, device="cpu")      # process group already initialised
    result = trainer.train()                     # or: with Trainer(...) as trainer: trainer.step()

The pieces: `TrainModule` (sft/train_module.py) builds the rank's model, DDP wrapper, distributed
optimizer and schedule and runs one forward/backward; the loop here takes the data-parallel rank's
micro-batches of the next global batch (sft/data.py, prefetched), steps (per-token loss normalisation,
docs/architecture.md; a step with a non-finite loss or gradient norm is skipped), lets the ranks agree
on stopping (SIGTERM/SIGUSR1 on any rank), and hands each step to the callbacks (sft/callbacks.py):
metrics and MFU, the non-finite guard, evaluation, checkpoints, the finished marker, the plot.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.devices import RECIPE_ACCELERATOR, find_accelerator, peak_tflops
from common.distributed import init_process_group
from common.errors import ConfigError, DataError
from formats.chat_template import TEMPLATES
from formats.torch_dist import TOKENIZER_DIR, verify_checkpoint
from models.backends import te_available
from models.hf_config import find_hf_config
from models.registry import Arch, family_of, read_arch

from .callbacks import Callback, StepResult, default_callbacks
from .checkpointing import (
    CheckpointSaver,
    TrainState,
    find_resume_checkpoint,
    load_checkpoint,
)
from .config import ScheduleConfig, TrainConfig, dump_config
from .data import MicroBatch, SFTData, ValidationData, default_valid_prefixes, layout_problems
from .metrics import MetricsLogger
from .train_module import TrainModule, initialize_model_parallel, warmup_steps
from .watchdog import StepWatchdog

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    iterations_done: int
    losses: dict[int, float]  # iteration -> global per-token loss
    stopped_by_signal: bool
    last_checkpoint: Path | None


def resolve_device(config: TrainConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


@dataclass
class RunInputs:
    """What a run reads before any process group or model exists, checked against the configuration."""

    data: SFTData
    arch: Arch
    resume_from: Path | None
    hf_config_file: Path  # the architecture, copied into every checkpoint
    tokenizer_dir: Path | None  # the tokenizer the starting checkpoint carries, copied along
    train_iters: int
    valid: ValidationData | None = None  # the held-out packs, when there are any


def _check_template(data: SFTData, arch: Arch) -> None:
    """The data's chat template must be one written in the model's special tokens (a name this project
    does not know, as synthetic test data's, cannot be checked: it is logged)."""
    family = family_of(arch)
    if data.chat_template not in TEMPLATES:
        log.warning("the data's chat template %r is none this project knows: not checked", data.chat_template)
    elif data.chat_template not in family.chat_templates:
        raise DataError(
            f"{data.datasets[0].prefix}: the data was encoded with the {data.chat_template} chat template, "
            f"which a {family.name} model does not speak: re-run tools/preprocess_sft.py with --template "
            f"{' or '.join(family.chat_templates)} and this model's tokenizer"
        )


def check_run(config: TrainConfig, world_size: int, device: str) -> RunInputs:
    """Opens the data and the starting checkpoint and validates the configuration against them and the
    world size; raises ConfigError (listing every problem) or DataError before anything heavy starts."""
    config.validate(world_size=world_size, te_available=te_available(device))  # paths first: cheap, complete
    data = SFTData(config.data.prefixes, config.data.weights, config.data.seed)
    valid = _validation_data(config, data.seq_length)
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
    hf_config_file = find_hf_config(source)
    tokenizer_dir = Path(source) / TOKENIZER_DIR if (Path(source) / TOKENIZER_DIR).is_dir() else None
    arch = read_arch(hf_config_file)
    config.validate(
        world_size=world_size, te_available=te_available(device), arch=arch, data_seq_length=data.seq_length
    )
    problems = data.layout_problems(config.parallel)
    if valid is not None:
        problems += layout_problems(valid.datasets, config.parallel)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    _check_template(data, arch)
    for dataset in data.datasets:
        if dataset.vocab_size > arch.vocab_size:
            raise DataError(
                f"{dataset.prefix}: the tokenizer has {dataset.vocab_size} tokens, the model's vocabulary "
                f"only {arch.vocab_size}: the data was tokenised for another model"
            )
    train_iters = _train_iters(config.schedule, data)
    return RunInputs(data, arch, resume_from, hf_config_file, tokenizer_dir, train_iters, valid)


def schedule_summary(train_iters: int, global_batch_size: int, packs: int) -> str:
    """The run's length as trained: its epochs are those its iterations make (schedule.train_iters may
    differ from schedule.epochs' count)."""
    epochs = train_iters * global_batch_size / packs
    return f"{train_iters} iterations of {global_batch_size} packs ({epochs:.3g} epochs over {packs} packs)"


def _train_iters(schedule: ScheduleConfig, data: SFTData) -> int:
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


def _validation_data(config: TrainConfig, seq_length: int) -> ValidationData | None:
    prefixes = config.data.valid_prefixes
    if prefixes is None:
        prefixes = default_valid_prefixes(config.data.prefixes)
        if prefixes:
            log.info("validation data: %s (found next to data.prefixes)", ", ".join(prefixes))
    if not prefixes:
        log.info("no validation data (data.valid_prefixes; tools/preprocess_sft.py --valid-fraction)")
        return None
    return ValidationData(prefixes, seq_length, config.eval.max_packs)


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        device: str,
        inputs: RunInputs | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        """Needs an initialised process group; `inputs` from check_run (done here when not given);
        `callbacks` run after the trainer's own (sft/callbacks.py)."""
        from megatron.core import parallel_state

        self.config, self.device = config, device
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        inputs = inputs or check_run(config, self.world_size, device)
        self.data, self.arch, self.valid = inputs.data, inputs.arch, inputs.valid
        self.resume_from, self.inputs = inputs.resume_from, inputs
        self.layout = config.parallel
        initialize_model_parallel(self.layout, config.timeout_minutes)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.row_width = self.data.row_width(self.layout)
        self.train_iters = inputs.train_iters
        self.peak_tflops = self._peak_tflops()
        self.metrics = MetricsLogger(config, self.rank == 0)  # before the heavy set-up: wandb fails early
        self.module = TrainModule(
            config,
            self.arch,
            device,
            self.train_iters,
            init_checkpoint=None if self.resume_from else config.model.init_checkpoint,
            load_group=self._load_group(),
        )
        if self.resume_from is None and not config.model.init_checkpoint:
            log.info(
                "initial weights: random (std %g) for %s",
                self.module.tconfig.init_method_std,
                config.model.random_init_config,
            )
        self.state = TrainState()
        if self.resume_from is not None:
            self.state = load_checkpoint(
                self.resume_from,
                self.module.chunks,
                self.module.optimizer,
                self.module.scheduler,
                self.layout,
                self.world_size,
                self._load_group(),
            )
            log.info(
                "resumed from %s at iteration %d (%d samples consumed)",
                self.resume_from,
                self.state.iteration,
                self.state.consumed_samples,
            )
        self.metrics.resume_at(self.state.iteration)
        self._stop_signal: int | None = None
        self.stop_agreed = False  # by every rank, after the last step (agree_on_stop)
        self.last_checkpoint: Path | None = None
        self.callbacks = [*default_callbacks(), *callbacks]
        self._prefetcher = ThreadPoolExecutor(1, "prefetch") if config.data.prefetch else None
        self.watchdog = StepWatchdog(config.watchdog, self.rank)
        self._prefetched: tuple[int, Future] | None = None  # (consumed samples it is for, its future)
        saving = config.checkpoint
        self.checkpoints = CheckpointSaver(
            saving.save_dir,
            keep_last_n=saving.keep_last_n,
            async_save=saving.async_save,
            fully_parallel_save=saving.fully_parallel_save,
            parallel_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            hf_config_file=inputs.hf_config_file,
            tokenizer_dir=inputs.tokenizer_dir,
            config_yaml=dump_config(config),
            training_data=self.data.training_data,
        )

    def _load_group(self):
        """The replicas that split the reading of a checkpoint (checkpoint.fully_parallel_load), or None."""
        from megatron.core import parallel_state

        if not self.config.checkpoint.fully_parallel_load:
            return None
        return parallel_state.get_data_parallel_group(with_context_parallel=True)

    # Set-up ------------------------------------------------------------------------------------------

    def _peak_tflops(self) -> float:
        """MFU's denominator: logging.peak_tflops_per_device, or the datasheet peak of this GPU."""
        configured = self.config.logging.peak_tflops_per_device
        if configured is not None:
            return configured
        name = torch.cuda.get_device_name() if self.device == "cuda" else None
        found = find_accelerator(name) if name else None
        if found is None and self.rank == 0:
            log.log(
                logging.WARNING if name else logging.INFO,
                "%s is not in common/devices.py: MFU is against the %s's %g TFLOP/s "
                "(set logging.peak_tflops_per_device)",
                name or "a CPU",
                RECIPE_ACCELERATOR.name,
                RECIPE_ACCELERATOR.bf16_dense_tflops,
            )
        return peak_tflops(name)

    # The loop ----------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Runs the remaining iterations (the callbacks do the rest: sft/callbacks.py), then releases
        everything (`close`)."""
        config = self.config
        if self.rank == 0:
            log.info("configuration:\n%s", dump_config(config))
            log.info(
                "%s, layout %s",
                schedule_summary(
                    self.train_iters, config.schedule.global_batch_size, self.data.order.epoch_size
                ),
                self.layout.describe(self.world_size),
            )
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        losses, failed = {}, True
        try:
            self._each_callback("on_start")
            while self.state.iteration < self.train_iters:
                loss = self.step().loss
                losses[self.state.iteration] = loss
                if self.stop_agreed:
                    log.warning(
                        "stopping after iteration %d on signal %s; checkpoint %s",
                        self.state.iteration,
                        signal.Signals(self._stop_signal).name if self._stop_signal else "(other rank)",
                        self.last_checkpoint,
                    )
                    break
            failed = False
        finally:
            try:
                self._each_callback("on_end", failed)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
                self.close()
        return TrainResult(
            self.state.iteration,
            losses,
            self._stop_signal is not None or self.state.iteration < self.train_iters,
            self.last_checkpoint,
        )

    def step(self) -> StepResult:
        """One iteration of the loop: the callbacks before it, the step under the watchdog, the ranks'
        agreement on stopping, the callbacks after it."""
        self._each_callback("before_step")
        with self.watchdog.step(self.state.iteration + 1):
            result = self.train_step()
            self.watchdog.phase("stop agreement")
            self.stop_agreed = self.agree_on_stop()
        self._each_callback("after_step", result)
        return result

    def _each_callback(self, hook: str, *args) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def train_step(self) -> StepResult:
        """One optimizer step on the next global batch (or a skipped one)."""
        state = self.state
        start = time.perf_counter()
        self.watchdog.phase("data")
        micro_batches = self._next_micro_batches(state.consumed_samples)
        if self.device == "cuda":
            micro_batches = [mb.to(torch.cuda.current_device()) for mb in micro_batches]
        self.watchdog.phase("forward-backward (gradient reduction included)")
        self.module.zero_grad()
        reduced = self.module.forward_backward(lambda: micro_batches, len(micro_batches), self.row_width)
        self.watchdog.phase("loss all-reduce")
        loss_sum, loss_tokens = self._global_loss(reduced)
        loss = loss_sum / max(loss_tokens, 1)
        self.watchdog.phase("gradient norm")
        found_inf, grad_norm = self.module.gradient_norm()
        finite = not found_inf and math.isfinite(loss) and math.isfinite(grad_norm)
        lr = self.module.lr  # the rate this step uses
        self.watchdog.phase("optimizer step")
        if finite:
            self.module.optimizer_step()
            state.consecutive_nonfinite = 0
        else:
            state.skipped_steps += 1
            state.consecutive_nonfinite += 1
        state.iteration += 1
        consumed_before = state.consumed_samples
        state.consumed_samples += self.config.schedule.global_batch_size
        if self.device == "cuda":
            torch.cuda.synchronize()
        return StepResult(
            loss, lr, grad_norm, loss_tokens, consumed_before, time.perf_counter() - start, finite
        )

    def agree_on_stop(self) -> bool:
        """Collective: whether any rank got a stop signal (saving is collective, so all ranks must agree
        to stop after the same iteration)."""
        flag = torch.tensor([0 if self._stop_signal is None else 1], dtype=torch.int32, device=self._device())
        dist.all_reduce(flag)
        return bool(flag.item())

    def close(self) -> None:
        """Releases the metrics sinks, the watchdog and the prefetch thread (idempotent)."""
        self.metrics.close()
        self.watchdog.close()
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True, cancel_futures=True)
            self._prefetcher = None

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Validation --------------------------------------------------------------------------------------

    def evaluate(self) -> float:
        """Collective: the validation loss, the per-token mean over every loss token of the held-out packs
        (forward only, through the same pipeline schedule as training); logged and returned."""
        start = time.perf_counter()
        count = self.valid.micro_batch_count(self.layout, self.dp_size)

        def batches():
            for batch in self.valid.micro_batches(self.layout, self.dp_rank, self.dp_size, self.cp_rank):
                yield batch.to(torch.cuda.current_device()) if self.device == "cuda" else batch

        # a forward over the packs of this many global batches takes less than as many training steps
        steps_worth = len(self.valid.packs) / self.config.schedule.global_batch_size
        with self.watchdog.watch("validation", self.state.iteration, steps_worth):
            reduced = self.module.forward_backward(batches, count, self.row_width, forward_only=True)
            loss_sum, loss_tokens = self._global_loss(reduced)
        val_loss = loss_sum / max(loss_tokens, 1)
        self.metrics.log_validation(
            self.state.iteration,
            {
                "val_loss": val_loss,
                "val_loss_tokens": loss_tokens,
                "val_packs": len(self.valid.packs),
                "val_time_s": time.perf_counter() - start,
            },
        )
        return val_loss

    def _prepare_micro_batches(self, consumed: int) -> list[MicroBatch]:
        batches = self.data.micro_batches(
            consumed,
            self.config.schedule.global_batch_size,
            self.layout,
            self.dp_rank,
            self.dp_size,
            self.cp_rank,
            self.config.loss.group_size if self.config.loss.normalization == "per_group" else None,
        )
        return [mb.pin_memory() for mb in batches] if self.device == "cuda" else batches

    def _next_micro_batches(self, consumed: int) -> list[MicroBatch]:
        """This step's micro-batches; with data.prefetch, the next step's are prepared in a background
        thread meanwhile (reading, packing and pinning stay off the critical path)."""
        prefetched, self._prefetched = self._prefetched, None
        batches = prefetched[1].result() if prefetched and prefetched[0] == consumed else None
        if batches is None:
            batches = self._prepare_micro_batches(consumed)
        if self._prefetcher is not None:
            following = consumed + self.config.schedule.global_batch_size
            self._prefetched = (following, self._prefetcher.submit(self._prepare_micro_batches, following))
        return batches

    def _device(self) -> torch.device:
        if self.device == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _global_loss(self, reduced: list[torch.Tensor]) -> tuple[float, int]:
        """[sum, count] over the global batch, known on every rank: only the first tensor-parallel rank of
        each last pipeline stage contributes (the others hold copies)."""
        from megatron.core import parallel_state

        totals = torch.zeros(2, dtype=torch.float64, device=self._device())
        if (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            for item in reduced:
                totals += item.to(totals.device, torch.float64)
        dist.all_reduce(totals)
        loss_sum, loss_tokens = totals.tolist()
        return loss_sum, int(loss_tokens)

    # Checkpoints and signals -------------------------------------------------------------------------

    def save(self) -> Path:
        """The checkpoint of the current iteration; with checkpoint.async_save it is complete only once
        `self.checkpoints` has published it (between later iterations, or at the end)."""
        return self.checkpoints.save(
            self.module.chunks,
            self.module.optimizer,
            self.module.scheduler,
            self.state,
            self.layout.to_dict(self.world_size),
        )

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum
        log.warning("received %s: will checkpoint and stop after this iteration", signal.Signals(signum).name)


# Entry point -----------------------------------------------------------------------------------------


def set_cuda_device_max_connections(layout, device: str, environ) -> None:
    """Tensor/sequence parallelism overlaps its communication with compute only in issue order, which
    needs one CUDA hardware queue: CUDA_DEVICE_MAX_CONNECTIONS=1, set before CUDA starts (as Megatron-LM
    requires); an explicit other value is kept, with a warning."""
    if device != "cuda" or (layout.tensor == 1 and not layout.sequence_parallel):
        return
    current = environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    if current is None:
        environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
        log.info(
            "CUDA_DEVICE_MAX_CONNECTIONS=1 (tensor parallelism orders its communication through one queue)"
        )
    elif current != "1":
        log.warning(
            "CUDA_DEVICE_MAX_CONNECTIONS=%s: tensor parallelism wants 1 (communication and compute may "
            "interleave in the wrong order and lose overlap)",
            current,
        )


def run(config: TrainConfig) -> TrainResult:
    """Validates, starts the process group, trains, tears down: the body of pretrain_sft.py."""
    import os

    from megatron.core import parallel_state

    device = resolve_device(config)
    inputs = check_run(config, int(os.environ.get("WORLD_SIZE", "1")), device)
    set_cuda_device_max_connections(config.parallel, device, os.environ)
    init_process_group(device, config.timeout_minutes)
    try:
        return Trainer(config, device, inputs).train()
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
