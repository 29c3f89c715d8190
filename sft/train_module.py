"""One rank's model, data-parallel wrapper, distributed optimizer and LR schedule: its training step
and its state.

The trainer (sft/trainer.py) and the dry run (sft/dry_run/) build a rank through this module, so the
dry run measures exactly what a real run builds. A subclass changes the kernels (`layer_spec`,
`kernel_settings`) or the weights' precision (`params_dtype`), nothing else.

    initialize_parallel_state(config.parallel, config.timeout_minutes)
    module = TrainModule(config, arch, "cuda", train_iters, init_checkpoint=config.model.init_checkpoint)
    module.zero_grad()
    reduced = module.forward_backward(lambda: micro_batches, len(micro_batches), row_width)
    loss_sum, loss_tokens = module.global_loss(reduced)
    found_inf, grad_norm = module.gradient_norm()
    if finite: module.optimizer_step()

    state = module.sharded_state_dict()               # model, optimizer, scheduler: what a checkpoint holds
    module.load_state_dict(dist_checkpointing.load(module.sharded_state_dict(loading=True), path), path)
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from models.backends import choose_backend
from models.megatron_settings import expert_settings, kernel_settings, recompute_settings
from models.packed_attention import packed_attention_kernel
from models.registry import Arch, family_of
from models.weights import assign_weights, load_weights

from .config import TrainConfig
from .data import MicroBatch

log = logging.getLogger(__name__)

# How the distributed optimizer's state is sharded in a checkpoint (megatron-core's names; the first
# reshards across data parallelism only, the second across every axis: checkpoint.reshardable_optimizer).
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"

# (loss mask, per-token losses) -> (masked loss sum, loss-token count, [sum, count] for logging)
LossFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def warmup_steps(warmup_ratio: float, train_iters: int) -> int:
    """HF Trainer's warm-up length, ceil(ratio x iterations): the recipe's schedule."""
    return math.ceil(warmup_ratio * train_iters)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """(sum of masked token losses, loss-token count, [sum, count] for logging): megatron-core divides
    the gradients by the global token count (calculate_per_token_loss)."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1)
    # The mask is 1 per trained token (its weight with loss.normalization=per_group), 0 elsewhere. `where`
    # keeps a NaN or inf at a masked position (padding, a prompt token) out of the sum, which a plain
    # product with the mask would not; the count is the number of trained tokens in either mode, the sum
    # megatron-core divides the gradients by.
    total = torch.where(mask > 0, losses * mask, 0.0).sum()
    count = (mask > 0).sum().to(torch.int)
    return total, count, torch.stack([total.detach(), count.detach().float()])


def unwrap(chunk):
    """The GPTModel inside the DDP and bf16 wrappers, whose state-dict keys are the checkpoint's (the
    wrappers would prefix them with `module.`, which the converters and other layouts do not expect)."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(chunk, (DistributedDataParallel, Float16Module)):
        chunk = chunk.module
    return chunk


def model_sharded_state_dict(chunks: list) -> dict[str, Any]:
    """All model chunks' sharded state (one entry per virtual stage; the tensor keys are global)."""
    return {_model_key(i, len(chunks)): unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(chunks)}


def _model_key(index: int, count: int) -> str:
    return f"model{index}" if count > 1 else "model"


class TrainModule:
    """Needs megatron-core's model-parallel groups (`plan.layout.initialize_parallel_state`).
    `init_checkpoint`: the weights to start from (None: random, or a resume that loads them afterwards);
    `load_group`: the replicas that split reading them; `loss_function`: each micro-batch's loss
    (`loss_func`'s contract)."""

    # megatron-core's gloo side groups (the distributed optimizer's checkpoint gathers); a fake process
    # group has none
    gloo_groups = True

    def __init__(
        self,
        config: TrainConfig,
        arch: Arch,
        device: str,
        train_iters: int,
        *,
        init_checkpoint: str | None = None,
        load_group=None,
        loss_function: LossFunction = loss_func,
    ):
        self.config, self.arch, self.device = config, arch, device
        self.loss_function = loss_function
        self.family = family_of(arch)
        self.layout = config.parallel
        self.train_iters = train_iters
        self.chunks, self.tconfig = self._build_model(init_checkpoint, load_group)
        self.optimizer, self.scheduler = self._build_optimizer()

    # What a subclass may change ---------------------------------------------------------------------

    def params_dtype(self) -> torch.dtype:
        precision = self.config.model.precision
        if precision == "auto":
            precision = "bf16" if self.device == "cuda" else "fp32"
        return torch.bfloat16 if precision == "bf16" else torch.float32

    def layer_spec(self):
        backend = choose_backend(self.device, self.config.model.attention)
        log.info(
            "layers: %s; attention: %s",
            backend.describe(),
            "Transformer Engine THD attention"
            if backend.transformer_engine
            else packed_attention_kernel(self.device, self.layout.context),
        )
        return self.family.layer_spec(self.arch, backend, packed=True)

    def kernel_settings(self) -> dict:
        return kernel_settings(choose_backend(self.device, self.config.model.attention), self.arch)

    def expert_settings(self) -> dict:
        """How a mixture of experts is laid out and dispatched (nothing for a dense model)."""
        model = self.config.model
        return expert_settings(
            self.arch,
            self.layout.expert,
            self.layout.expert_tensor_size,
            model.moe_dispatcher,
            model.moe_aux_loss_coef,
        )

    def deallocate_pipeline_outputs(self) -> bool:
        """Whether a stage's output, once sent on, is kept only as autograd's handle to its graph (as
        Megatron-LM does): otherwise each micro-batch in flight keeps [tokens, hidden] more. On CUDA
        only: gloo's asynchronous sends read the buffer after the schedule has freed it (NCCL's are
        ordered on the stream, and the allocator does not hand the memory out before they ran)."""
        return self.device == "cuda"

    # Construction ------------------------------------------------------------------------------------

    def _build_model(self, init_checkpoint: str | None, load_group):
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.transformer.module import Float16Module

        config, layout, on_gpu = self.config, self.layout, self.device == "cuda"
        tensor_parallel.model_parallel_cuda_manual_seed(config.seed)
        spec = self.layer_spec()
        tconfig = self.family.transformer_config(
            self.arch,
            tensor_parallel=layout.tensor,
            pipeline_parallel=layout.pipeline,
            params_dtype=self.params_dtype(),
            use_cpu_initialization=not on_gpu,
            virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
            context_parallel_size=layout.context,
            sequence_parallel=layout.sequence_parallel,
            calculate_per_token_loss=True,
            # Interleaved stages overlap their sends and receives (as Megatron-LM does). Batched p2p is off
            # on gloo: two messages between the same pair of ranks in one batch can be matched in the wrong
            # order there (seen at PP=2 with virtual stages: wrong activations, no error).
            overlap_p2p_comm=layout.virtual_pipeline is not None,
            batch_p2p_comm=on_gpu and layout.virtual_pipeline is None,
            deallocate_pipeline_outputs=self.deallocate_pipeline_outputs(),
            **recompute_settings(config.model.recompute, config.model.recompute_modules),
            **self.kernel_settings(),
            **self.expert_settings(),
        )
        chunks = []
        for vp_stage in range(layout.virtual_stages):
            stage = vp_stage if layout.virtual_pipeline else None
            model = self.family.build_model(
                self.arch,
                tconfig,
                spec,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                vp_stage=stage,
            )
            if on_gpu:
                model.cuda(torch.cuda.current_device())
            chunks.append(model)
        if init_checkpoint:
            load_weights(chunks, init_checkpoint, load_group)
            log.info("initial weights: %s", init_checkpoint)
        if tconfig.bf16:
            chunks = [Float16Module(tconfig, chunk) for chunk in chunks]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=True, average_in_collective=False
        )
        chunks = [
            DistributedDataParallel(tconfig, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        tconfig.finalize_model_grads_func = finalize_model_grads
        return chunks, tconfig

    def _build_optimizer(self):
        from megatron.core import optimizer as mcore_optimizer
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        settings = self.config.optimizer
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=settings.lr,
                min_lr=settings.min_lr,
                weight_decay=settings.weight_decay,
                adam_beta1=settings.beta1,
                adam_beta2=settings.beta2,
                adam_eps=settings.eps,
                clip_grad=settings.clip_grad,
                bf16=self.tconfig.bf16,
                params_dtype=self.params_dtype(),
                use_distributed_optimizer=True,
            ),
            self.chunks,
            use_gloo_process_groups=self.gloo_groups,
        )
        self.tconfig.grad_scale_func = optimizer.scale_loss
        log.info(
            "optimizer: megatron-core distributed optimizer over %s.%s",
            mcore_optimizer.Adam.__module__,
            mcore_optimizer.Adam.__name__,
        )
        # HF Trainer's warm-up length (ceil) and cosine: megatron-core's formula gives the same values.
        warmup = warmup_steps(self.config.schedule.warmup_ratio, self.train_iters)
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=settings.lr,
            min_lr=settings.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=self.train_iters,
            lr_decay_style="cosine",
            start_wd=settings.weight_decay,
            end_wd=settings.weight_decay,
            wd_incr_steps=self.train_iters,
            wd_incr_style="constant",
        )
        return optimizer, scheduler

    # The step ----------------------------------------------------------------------------------------

    @property
    def collective_device(self) -> torch.device:
        """Where this rank's collectives take their tensors: its GPU (NCCL), or the CPU (gloo)."""
        return (
            torch.device("cuda", torch.cuda.current_device())
            if self.device == "cuda"
            else torch.device("cpu")
        )

    @property
    def lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def forward_backward(
        self,
        batches: Callable[[], Iterable[MicroBatch]],
        count: int,
        row_width: int,
        forward_only: bool = False,
    ) -> list[torch.Tensor]:
        """`count` micro-batches through megatron-core's pipeline schedule (backward too unless
        `forward_only`); `batches()` gives them in order, called once per model chunk (each chunk reads
        its own iterator). Returns the last stage's [loss sum, count] per micro-batch (empty elsewhere)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        iterators = [iter(batches()) for _ in self.chunks]
        if forward_only:
            for chunk in self.chunks:
                chunk.eval()
        try:
            with torch.no_grad() if forward_only else contextlib.nullcontext():
                return get_forward_backward_func()(
                    forward_step_func=self._forward_step,
                    data_iterator=iterators if len(self.chunks) > 1 else iterators[0],
                    model=self.chunks,
                    num_microbatches=count,
                    seq_length=row_width,
                    micro_batch_size=1,
                    forward_only=forward_only,
                )
        finally:
            if forward_only:
                for chunk in self.chunks:
                    chunk.train()

    def _forward_step(self, data_iterator, model):
        """megatron-core's forward step: the next micro-batch through `model` (one chunk), and the loss
        function of its output."""
        batch: MicroBatch = next(data_iterator)
        output = model(
            batch.tokens,
            batch.position_ids,
            attention_mask=None,
            labels=batch.labels,
            packed_seq_params=batch.packed_seq_params(),
        )
        return output, partial(self.loss_function, batch.loss_mask)

    def global_loss(self, reduced: list[torch.Tensor]) -> tuple[float, int]:
        """Collective: [sum, count] of `forward_backward`'s micro-batches over the global batch, known on
        every rank: only the first tensor-parallel rank of each last pipeline stage contributes (the
        others hold copies)."""
        from megatron.core import parallel_state

        totals = torch.zeros(2, dtype=torch.float64, device=self.collective_device)
        if (
            parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            for item in reduced:
                totals += item.to(totals.device, torch.float64)
        dist.all_reduce(totals)
        loss_sum, loss_tokens = totals.tolist()
        return loss_sum, int(loss_tokens)

    def gradient_norm(self) -> tuple[bool, float]:
        """(whether a gradient is not finite, the global gradient norm). Checked before stepping:
        megatron-core's bf16/fp32 step has no finiteness check of its own (only fp16 loss scaling has
        one); step() repeats prepare_grads, an idempotent copy into the main grads."""
        found_inf = self.optimizer.prepare_grads()
        return bool(found_inf), float(self.optimizer.get_grad_norm())

    def optimizer_step(self) -> None:
        """The distributed optimizer's step (clipping included) and the scheduler's."""
        self.optimizer.step()
        self.scheduler.step(increment=1)

    # State -------------------------------------------------------------------------------------------

    @property
    def optimizer_sharding(self) -> str:
        """The optimizer state's sharding in the checkpoints this module saves."""
        return FULLY_RESHARDABLE if self.config.checkpoint.reshardable_optimizer else DP_RESHARDABLE

    def sharded_state_dict(
        self, *, loading: bool = False, optimizer_sharding: str | None = None
    ) -> dict[str, Any]:
        """This rank's share of the model (one entry per virtual stage), the distributed optimizer and the
        scheduler, as megatron-core's dist_checkpointing saves it, or, `loading`, the template it loads
        into (then the torch Adam state that megatron-core's loader reads the structure of exists);
        `optimizer_sharding`: a checkpoint's, when it is not this module's."""
        if loading:
            self._materialise_torch_adam_state()
        model = model_sharded_state_dict(self.chunks)
        sharding = optimizer_sharding or self.optimizer_sharding
        return {
            **model,
            "optimizer": self.optimizer.sharded_state_dict(
                model, is_loading=loading, metadata=_optimizer_metadata(sharding)
            ),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], source: str | Path) -> None:
        """Restores what `sharded_state_dict(loading=True)`'s template was loaded with from `source` (named
        in the error when the weights do not match the model)."""
        for i, chunk in enumerate(self.chunks):
            assign_weights(unwrap(chunk), state[_model_key(i, len(self.chunks))], source)
        # Under no_grad, or torch refuses the in-place copy into views of leaves that require grad.
        with torch.no_grad(), _torch_adam_step_left_alone(self._distributed_optimizers()):
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._restore_adam_step(self.scheduler.num_steps)

    def _distributed_optimizers(self) -> list:
        return list(getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def _torch_adams(self) -> list:
        inner = [
            getattr(chained, "optimizer", None)
            for chained in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        ]
        return [o for o in inner if isinstance(o, (torch.optim.Adam, torch.optim.AdamW))]

    def _materialise_torch_adam_state(self) -> None:
        """torch's Adam (megatron-core's fallback without TE or apex) creates its per-parameter state at
        the first step; megatron-core's loader reads that state to build the structure it loads into, so
        a fresh optimizer gets zero state first (the moments are then overwritten by the load; see
        _restore_adam_step)."""
        for adam in self._torch_adams():
            for group in adam.param_groups:
                for param in group["params"]:
                    if not adam.state[param]:
                        adam.state[param].update(
                            step=torch.tensor(0.0),
                            exp_avg=torch.zeros_like(param),
                            exp_avg_sq=torch.zeros_like(param),
                        )

    def _restore_adam_step(self, successful_steps: int) -> None:
        """Adam's bias-correction step count, set from the scheduler, which advances exactly on the
        successful optimizer steps: torch's Adam keeps it per parameter, and megatron-core's loader
        writes back the template's value (0) after restoring the moments; the fused Adams of TE and
        apex keep it per parameter group, which a 'fully_reshardable' checkpoint leaves at the
        template's (sft/checkpointing.py keeps the loading layout's groups)."""
        torch_adams = self._torch_adams()
        for adam in torch_adams:
            for state in adam.state.values():
                state["step"] = torch.tensor(float(successful_steps))
        for distributed in self._distributed_optimizers():
            inner = getattr(distributed, "optimizer", None)
            if inner is not None and not any(inner is adam for adam in torch_adams):
                for group in inner.param_groups:
                    group["step"] = successful_steps


def _optimizer_metadata(sharding: str) -> dict[str, Any]:
    """What megatron-core's sharded_state_dict of the (chained) distributed optimizer is told. The fully
    reshardable state is gathered per data-parallel group over gloo into its first rank (the 'memory
    efficient' variant: the other one gathers over NCCL into every rank's host memory), and its keys are
    the parameters' alone, so that expert and dense parameters, split into two chained optimizers only
    at EP > 1, find their state at any EP."""
    if sharding == FULLY_RESHARDABLE:
        return {
            "distrib_optim_sharding_type": FULLY_RESHARDABLE,
            "distrib_optim_fully_reshardable_mem_efficient": True,
            "chained_optim_avoid_prefix": True,
        }
    return {"distrib_optim_sharding_type": sharding}


@contextlib.contextmanager
def _torch_adam_step_left_alone(distributed_optimizers: list):
    """megatron-core 0.16.1's 'fully_reshardable' loader copies every entry of a parameter's optimizer
    state from the checkpoint (optimizer/distrib_optimizer.py, _set_main_param_and_optimizer_states:
    `dst_tensors[key].copy_(tensors[key])`), torch Adam's per-parameter 'step' too, which that format does
    not hold (it fails with KeyError: 'step'). While loading, the step is copied onto itself; the module
    then sets it from the scheduler (TrainModule._restore_adam_step)."""
    originals = {}
    for distributed in distributed_optimizers:
        setter = getattr(distributed, "_set_main_param_and_optimizer_states", None)
        if setter is None:
            continue

        def set_states(model_param, tensors, distributed=distributed, setter=setter):
            group, order = distributed.model_param_group_index_map[model_param]
            main_param = distributed.optimizer.param_groups[group]["params"][order]
            step = distributed.optimizer.state.get(main_param, {}).get("step")
            if step is not None and "step" not in tensors:
                tensors = {**tensors, "step": step}
            return setter(model_param, tensors)

        originals[distributed] = setter
        distributed._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        for distributed in originals:
            del distributed._set_main_param_and_optimizer_states  # the class's method again
