"""The SFT trainer on megatron-core: model set-up, forward step and loss, the training loop.

Started once per process by pretrain_sft.py (torchrun / Slurm), or in each rank of run_distributed (tests):

    trainer = Trainer(config, device="cpu")      # process group already initialised
    result = trainer.train()

The loop, per iteration: the data-parallel rank's micro-batches of the next global batch
(sft/data.py), forward and backward through megatron-core's pipeline schedule (1F1B, interleaved with
virtual stages), per-token loss normalisation (docs/architecture.md), a finiteness check of the loss and
gradient norm (a non-finite step is skipped, and the run aborts after `max_consecutive_nonfinite` in a
row), the distributed optimizer's step, the scheduler, metrics, and checkpoints at the save interval,
at the end and on SIGTERM/SIGUSR1.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from common.devices import RECIPE_ACCELERATOR, find_accelerator, peak_tflops
from common.distributed import init_process_group
from common.errors import ConfigError, DataError
from common.files import write_json_atomic
from formats.torch_dist import TOKENIZER_DIR, verify_checkpoint
from models.backends import te_available
from models.qwen2.arch import Qwen2Arch, find_hf_config
from models.qwen2.flops import training_flops

from .checkpointing import (
    FINISHED_FILE,
    CheckpointSaver,
    TrainState,
    find_resume_checkpoint,
    load_checkpoint,
)
from .config import TrainConfig, dump_config
from .data import MicroBatch, SFTData, ValidationData, default_valid_prefixes, layout_problems
from .metrics import MetricsLogger, peak_memory_gb
from .plots import plot_metrics
from .train_module import TrainModule, initialize_model_parallel, warmup_steps
from .watchdog import StepWatchdog

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


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
    arch: Qwen2Arch
    resume_from: Path | None
    hf_config_file: Path  # the architecture, copied into every checkpoint
    tokenizer_dir: Path | None  # the tokenizer the starting checkpoint carries, copied along
    train_iters: int
    valid: ValidationData | None = None  # the held-out packs, when there are any


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
    arch = Qwen2Arch.from_path(hf_config_file)
    config.validate(
        world_size=world_size, te_available=te_available(device), arch=arch, data_seq_length=data.seq_length
    )
    problems = data.layout_problems(config.parallel)
    if valid is not None:
        problems += layout_problems(valid.datasets, config.parallel)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    for dataset in data.datasets:
        if dataset.vocab_size > arch.vocab_size:
            raise DataError(
                f"{dataset.prefix}: the tokenizer has {dataset.vocab_size} tokens, the model's vocabulary "
                f"only {arch.vocab_size}: the data was tokenised for another model"
            )
    s = config.schedule
    train_iters = s.train_iters or data.iterations(s.epochs, s.global_batch_size)
    if train_iters < 1:
        raise ConfigError(
            f"{data.order.epoch_size} packs x {s.epochs} epochs do not fill one global batch of "
            f"{s.global_batch_size}: lower schedule.global_batch_size"
        )
    if warmup_steps(s.warmup_ratio, train_iters) >= train_iters:
        raise ConfigError(
            f"schedule.warmup_ratio={s.warmup_ratio} of {train_iters} iteration(s) is "
            f"{warmup_steps(s.warmup_ratio, train_iters)} warm-up step(s), which leaves no step to decay "
            "over: lower schedule.warmup_ratio (0 for a run this short) or train longer"
        )
    return RunInputs(data, arch, resume_from, hf_config_file, tokenizer_dir, train_iters, valid)


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
    def __init__(self, config: TrainConfig, device: str, inputs: RunInputs | None = None):
        """Needs an initialised process group; `inputs` from check_run (done here when not given)."""
        from megatron.core import parallel_state

        self.config, self.device = config, device
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        inputs = inputs or check_run(config, self.world_size, device)
        self.data, self.arch, self.valid = inputs.data, inputs.arch, inputs.valid
        self.resume_from, self.inputs = inputs.resume_from, inputs
        p = self.layout = config.parallel
        initialize_model_parallel(p, config.timeout_minutes)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.row_width = self.data.row_width(p)
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
        self.chunks, self.optimizer, self.scheduler = (
            self.module.chunks,
            self.module.optimizer,
            self.module.scheduler,
        )
        self.state = TrainState()
        if self.resume_from is not None:
            self.state = load_checkpoint(
                self.resume_from,
                self.chunks,
                self.optimizer,
                self.scheduler,
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
        self._stop_agreed = False  # set by each step's loss all-reduce
        self._prefetcher = ThreadPoolExecutor(1, "prefetch") if config.data.prefetch else None
        self.watchdog = StepWatchdog(config.watchdog, self.rank)
        self._prefetched: tuple[int, Future] | None = None  # (consumed samples it is for, its future)
        cc = config.checkpoint
        self.checkpoints = CheckpointSaver(
            cc.save_dir,
            keep_last_n=cc.keep_last_n,
            async_save=cc.async_save,
            fully_parallel_save=cc.fully_parallel_save,
            parallel_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            hf_config_file=inputs.hf_config_file,
            tokenizer_dir=inputs.tokenizer_dir,
            config_yaml=dump_config(config),
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
        c = self.config
        if self.rank == 0:
            log.info("configuration:\n%s", dump_config(c))
            log.info(
                "%d iterations of %d packs (%d epochs over %d packs), layout %s",
                self.train_iters,
                c.schedule.global_batch_size,
                c.schedule.epochs,
                self.data.order.epoch_size,
                self.layout.describe(self.world_size),
            )
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        losses, last_checkpoint, failed = {}, None, True
        try:
            while self.state.iteration < self.train_iters:
                with self.watchdog.step(self.state.iteration + 1):
                    loss = self.train_step()
                losses[self.state.iteration] = loss
                self.checkpoints.poll()
                stop = self._stop_agreed
                if self._evaluation_due():
                    self.evaluate()
                at_end = self.state.iteration == self.train_iters and c.checkpoint.save_at_end
                if stop or at_end or self.state.iteration % c.checkpoint.save_interval == 0:
                    last_checkpoint = self.save()
                if stop:
                    self.checkpoints.wait()
                    log.warning(
                        "stopping after iteration %d on signal %s; checkpoint %s",
                        self.state.iteration,
                        signal.Signals(self._stop_signal).name if self._stop_signal else "(other rank)",
                        last_checkpoint,
                    )
                    break
            self.checkpoints.wait()
            failed = False
        finally:
            self.checkpoints.close(abort=failed)  # a failing run's other ranks may be gone: no collective
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.metrics.close()
            self.watchdog.close()
            if self._prefetcher is not None:
                self._prefetcher.shutdown(wait=True, cancel_futures=True)
        if self.state.iteration >= self.train_iters and self.rank == 0:
            write_json_atomic(
                Path(c.checkpoint.save_dir) / FINISHED_FILE,
                {
                    "iterations": self.state.iteration,
                    "consumed_samples": self.state.consumed_samples,
                    "skipped_steps": self.state.skipped_steps,
                    "checkpoint": str(last_checkpoint) if last_checkpoint else None,
                },
            )
        if self.rank == 0 and c.logging.plot:
            self._plot_curves()
        return TrainResult(
            self.state.iteration,
            losses,
            self._stop_signal is not None or self.state.iteration < self.train_iters,
            last_checkpoint,
        )

    def train_step(self) -> float:
        """One optimizer step on the next global batch (or a skipped one); returns the global loss."""
        c, s = self.config, self.state
        start = time.perf_counter()
        self.watchdog.phase("data")
        micro_batches = self._next_micro_batches(s.consumed_samples)
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
            s.consecutive_nonfinite = 0
        else:
            s.skipped_steps += 1
            s.consecutive_nonfinite += 1
        s.iteration += 1
        consumed_before = s.consumed_samples
        s.consumed_samples += c.schedule.global_batch_size
        if self.device == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - start
        self.watchdog.phase("metrics")
        self._log(loss, lr, grad_norm, loss_tokens, consumed_before, step_time, finite)
        if not finite and s.consecutive_nonfinite >= c.schedule.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{s.consecutive_nonfinite} consecutive iterations (up to {s.iteration}) had a non-finite "
                "loss or "
                f"gradient norm (loss {loss}, grad norm {grad_norm}); the weights are those of the last "
                "good step. "
                "Lower optimizer.lr, check the data, or resume from an earlier checkpoint."
            )
        return loss

    def _plot_curves(self) -> None:
        """SAVE_DIR/metrics.png from metrics.jsonl; a failure to draw is no reason to fail a trained run."""
        out = self.metrics.path.with_name("metrics.png")
        try:
            plot_metrics(self.metrics.path, out)
        except Exception as exc:
            log.warning("could not draw %s: %s", out, exc)
        else:
            log.info("training curves: %s", out)

    # Validation --------------------------------------------------------------------------------------

    def _evaluation_due(self) -> bool:
        interval, iteration = self.config.eval.interval, self.state.iteration
        at_interval = interval > 0 and iteration % interval == 0
        return self.valid is not None and (at_interval or iteration == self.train_iters)

    def evaluate(self) -> float:
        """Collective: the validation loss, the per-token mean over every loss token of the held-out packs
        (forward only, through the same pipeline schedule as training); logged and returned."""
        start = time.perf_counter()
        count = self.valid.micro_batch_count(self.layout, self.dp_size)

        def batches():
            for batch in self.valid.micro_batches(self.layout, self.dp_rank, self.dp_size, self.cp_rank):
                yield batch.to(torch.cuda.current_device()) if self.device == "cuda" else batch

        reduced = self.module.forward_backward(batches, count, self.row_width, forward_only=True)
        loss_sum, loss_tokens = self._global_loss(reduced, carry_stop=False)
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

    def _global_loss(self, reduced: list[torch.Tensor], carry_stop: bool = True) -> tuple[float, int]:
        """[sum, count] over the global batch, known on every rank: only the first tensor-parallel rank of
        each last pipeline stage contributes (the others hold copies). With `carry_stop` the same
        all-reduce carries whether any rank got a stop signal (saving is collective, so all ranks must
        agree)."""
        from megatron.core import parallel_state

        device = (
            torch.device("cuda", torch.cuda.current_device())
            if self.device == "cuda"
            else torch.device("cpu")
        )
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        if (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            for item in reduced:
                totals[:2] += item.to(device, torch.float64)
        totals[2] = 1.0 if carry_stop and self._stop_signal is not None else 0.0
        dist.all_reduce(totals)
        loss_sum, loss_tokens, stops = totals.tolist()
        if carry_stop:
            self._stop_agreed = stops > 0
        return loss_sum, int(loss_tokens)

    def _log(self, loss, lr, grad_norm, loss_tokens, consumed_before, step_time, finite) -> None:
        c, s = self.config, self.state
        if self.rank != 0 or s.iteration % c.logging.log_interval and s.iteration != self.train_iters:
            return
        lengths = self.data.conversation_lengths(consumed_before, c.schedule.global_batch_size)
        tokens = int(lengths.sum())
        tflops = training_flops(self.arch, lengths) / step_time / self.world_size / 1e12
        self.metrics.log(
            s.iteration,
            {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "loss_tokens": loss_tokens,
                "tokens": tokens,
                "skipped_steps": s.skipped_steps,
                "step_skipped": not finite,
                "step_time_s": step_time,
                "tokens_per_s": tokens / step_time,
                "tflops_per_device": tflops,
                "mfu": tflops / self.peak_tflops,
                "peak_memory_gb": peak_memory_gb(self.device),
                "consumed_samples": s.consumed_samples,
                "epoch": s.consumed_samples / self.data.order.epoch_size,
            },
        )

    # Checkpoints and signals -------------------------------------------------------------------------

    def save(self) -> Path:
        """The checkpoint of the current iteration; with checkpoint.async_save it is complete only once
        `self.checkpoints` has published it (between later iterations, or at the end)."""
        return self.checkpoints.save(
            self.chunks, self.optimizer, self.scheduler, self.state, self.layout.to_dict(self.world_size)
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
