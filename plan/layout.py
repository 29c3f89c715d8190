"""The parallel layout of a run: tensor x pipeline (x virtual stages) x context x data parallelism, and
for a mixture of experts, expert (x expert-tensor) parallelism.

One type, used by the trainer's configuration (its `parallel:` section), the trainer, checkpointing,
the converters' verifier and the layout planner, so the rules that make a layout valid are written once
(`problems`), and so is the set-up of megatron-core's process groups for it (`initialize_parallel_state`):

    layout = ParallelLayout(tensor=8, pipeline=2, virtual_pipeline=4, context=2, sequence_parallel=True)
    layout.data_parallel(world_size=256)        # 8
    layout.problems(world_size=256, arch=arch, global_batch=512, seq_length=32768)

Data parallelism is what the world size leaves: world = tensor x pipeline x context x data. The experts
are laid out over the same ranks another way (megatron-core's): each pipeline stage's tensor x context x
data ranks are regrouped into expert x expert-tensor x expert-data, each layer's experts split over the
expert ranks, each expert's weights over the expert-tensor ranks. Messages name the configuration keys
(`parallel.*`), since that is where a user changes a layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODEL_PARALLEL_KEYS = ("tensor", "pipeline", "virtual_pipeline", "context", "expert", "expert_tensor")
# The sizes that cut the weights, hence the distributed optimizer's state: context parallelism does not
# (the optimizer shards over data x context-parallel replicas alike).
WEIGHT_SHARDING_KEYS = ("tensor", "pipeline", "virtual_pipeline", "expert", "expert_tensor")


@dataclass
class ParallelLayout:
    tensor: int = 1  # tensor-parallel ranks: each layer's weights split across them
    pipeline: int = 1  # pipeline stages: the layers split into consecutive groups
    virtual_pipeline: int | None = None  # interleaved 1F1B: model chunks per pipeline rank
    context: int = 1  # context-parallel ranks: each row's tokens split across them
    sequence_parallel: bool = False  # the norms' and residuals' tokens split over the TP ranks (TP > 1)
    micro_batch_size: int = 1  # packs per micro-batch
    expert: int = 1  # expert-parallel ranks (a mixture of experts): each layer's experts split across them
    # expert-tensor-parallel ranks: each expert's weights split across them (null: parallel.tensor)
    expert_tensor: int | None = None

    @property
    def model_parallel_size(self) -> int:
        return self.tensor * self.pipeline * self.context

    @property
    def expert_tensor_size(self) -> int:
        """The expert-tensor-parallel size in effect (megatron-core's default: the tensor-parallel size)."""
        return self.expert_tensor or self.tensor

    @property
    def virtual_stages(self) -> int:
        """Model chunks per pipeline rank (1 without interleaving)."""
        return self.virtual_pipeline or 1

    @property
    def pad_multiple(self) -> int:
        """Context parallelism pads each conversation to a multiple of 2 x CP (x TP with sequence
        parallelism), so that every rank gets equal, causally balanced chunks (sft/data.py)."""
        if self.context == 1:
            return 1
        return 2 * self.context * (self.tensor if self.sequence_parallel else 1)

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def micro_batches_per_step(self, global_batch: int, world_size: int) -> int:
        return global_batch // (self.micro_batch_size * self.data_parallel(world_size))

    def sizes(self) -> dict[str, Any]:
        """The model-parallel sizes in effect, by configuration key."""
        return {k: getattr(self, k) for k in MODEL_PARALLEL_KEYS} | {"expert_tensor": self.expert_tensor_size}

    def to_dict(self, world_size: int) -> dict[str, Any]:
        """The layout as stored with a checkpoint, including the data-parallel size."""
        return {**self.sizes(), "data": self.data_parallel(world_size)}

    def weight_sharding_changes(self, saved: dict[str, Any]) -> dict[str, tuple]:
        """{key: (saved, now)} for every size that cuts the weights and differs from a checkpoint's layout
        (one saved before experts were laid out had none: expert 1, expert-tensor = its tensor size)."""
        saved = {"expert": 1, "expert_tensor": saved.get("tensor"), **saved}
        now = self.sizes()
        return {k: (saved.get(k), now[k]) for k in WEIGHT_SHARDING_KEYS if saved.get(k) != now[k]}

    def problems(
        self,
        *,
        world_size: int,
        arch=None,
        global_batch: int | None = None,
        seq_length: int | None = None,
    ) -> list[str]:
        """Every reason this layout cannot run, for the given world size and, when given, the model
        (an architecture from models/registry.py), the global batch (packs per step) and the row length."""
        sizes = (
            self.tensor,
            self.pipeline,
            self.context,
            self.micro_batch_size,
            self.expert,
            self.expert_tensor_size,
        )
        if min(sizes) < 1:
            return [
                "parallel.tensor, pipeline, context, micro_batch_size, expert and expert_tensor must be >= 1"
            ]
        problems = []
        if world_size % self.model_parallel_size:
            problems.append(
                f"{world_size} processes are not divisible by tensor x pipeline x context = "
                f"{self.model_parallel_size}: change the layout or the number of processes"
            )
        elif global_batch is not None:
            problems += self._batch_problems(world_size, global_batch)
        expert_ranks = self.pipeline * self.expert * self.expert_tensor_size
        if world_size % expert_ranks:
            problems.append(
                f"{world_size} processes are not divisible by pipeline x expert x expert_tensor = "
                f"{expert_ranks} (each stage's ranks are regrouped into expert x expert-tensor x expert-data "
                "parallel): change parallel.expert or parallel.expert_tensor"
            )
        if self.virtual_pipeline is not None and (self.pipeline < 2 or self.virtual_pipeline < 2):
            problems.append(
                "parallel.virtual_pipeline needs parallel.pipeline >= 2 and a value >= 2 (or null)"
            )
        if self.sequence_parallel and self.tensor == 1:
            problems.append(
                "parallel.sequence_parallel=true needs parallel.tensor > 1 (it splits the tokens over the "
                "tensor-parallel ranks): raise parallel.tensor or turn it off"
            )
        if seq_length is not None:
            problems += self._row_problems(seq_length)
        if arch is not None:
            problems += self._model_problems(arch)
        return problems

    def _row_problems(self, seq_length: int) -> list[str]:
        row = (
            f"{self.micro_batch_size} x {seq_length}-token row (parallel.micro_batch_size x data.seq_length)"
        )
        width = self.micro_batch_size * seq_length
        if self.context > 1 and width % self.pad_multiple:
            sp = " x parallel.tensor" if self.sequence_parallel else ""
            return [
                f"parallel.context={self.context} cuts every conversation of a row, its trailing padding "
                f"included, into 2 x parallel.context{sp} = {self.pad_multiple} equal pieces: the {row} "
                f"must be a multiple of {self.pad_multiple}"
            ]
        if self.sequence_parallel and width % self.tensor:
            return [
                f"parallel.sequence_parallel splits the {row} across parallel.tensor={self.tensor} ranks: "
                "make it divisible"
            ]
        return []

    def _batch_problems(self, world_size: int, global_batch: int) -> list[str]:
        dp = self.data_parallel(world_size)
        if global_batch % (self.micro_batch_size * dp):
            return [
                f"schedule.global_batch_size={global_batch} is not divisible by parallel.micro_batch_size x "
                f"data-parallel size = {self.micro_batch_size} x {dp}"
            ]
        micro_batches = global_batch // (self.micro_batch_size * dp)
        if self.virtual_pipeline is not None and micro_batches % self.pipeline:
            # megatron-core's interleaved schedule runs micro-batches in groups of PP per virtual stage
            return [
                f"parallel.virtual_pipeline needs the {micro_batches} micro-batches per step (global batch / "
                "(micro_batch_size x data-parallel size)) to be a multiple of "
                f"parallel.pipeline={self.pipeline}"
            ]
        return []

    def _model_problems(self, arch) -> list[str]:
        problems = []
        if arch.num_attention_heads % self.tensor or arch.num_query_groups % self.tensor:
            problems.append(
                f"parallel.tensor={self.tensor} must divide the attention heads ({arch.num_attention_heads}) "
                f"and query groups ({arch.num_query_groups})"
            )
        if arch.vocab_size % self.tensor:
            problems.append(
                f"parallel.tensor={self.tensor} must divide the vocabulary size ({arch.vocab_size})"
            )
        stages = self.pipeline * self.virtual_stages
        if arch.num_layers % stages:
            problems.append(
                f"{arch.num_layers} layers are not divisible by parallel.pipeline x virtual_pipeline = "
                f"{stages}"
            )
        return problems + self._expert_problems(arch)

    def _expert_problems(self, arch) -> list[str]:
        moe = getattr(arch, "moe", None)
        if moe is None:
            if self.expert > 1 or self.expert_tensor is not None:
                return ["parallel.expert and parallel.expert_tensor apply to a mixture-of-experts model only"]
            return []
        problems = []
        if moe.num_experts % self.expert:
            problems.append(f"parallel.expert={self.expert} must divide the {moe.num_experts} experts")
        if moe.expert_ffn_hidden_size % self.expert_tensor_size:
            problems.append(
                f"parallel.expert_tensor={self.expert_tensor_size} must divide the experts' width "
                f"({moe.expert_ffn_hidden_size})"
            )
        if self.tensor > 1 and not self.sequence_parallel:
            problems.append(
                "a mixture of experts with parallel.tensor > 1 needs parallel.sequence_parallel=true "
                "(megatron-core's MoE layer refuses to train without it)"
            )
        return problems

    def describe(self, world_size: int) -> str:
        vp = f" (x{self.virtual_pipeline} virtual)" if self.virtual_pipeline else ""
        sp = " +SP" if self.sequence_parallel else ""
        ep = f" EP{self.expert}" if self.expert > 1 else ""
        ep += f" ETP{self.expert_tensor_size}" if self.expert_tensor_size != self.tensor else ""
        return (
            f"TP{self.tensor}{sp} PP{self.pipeline}{vp} CP{self.context} DP{self.data_parallel(world_size)}"
            f"{ep}, micro-batch {self.micro_batch_size}"
        )


def initialize_parallel_state(
    layout: ParallelLayout, timeout_minutes: float = 60, gloo_groups: bool = True
) -> None:
    """megatron-core's process groups for `layout` on the initialised default group (gloo side groups only
    with `gloo_groups`: a fake process group has no gloo)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        layout.tensor,
        layout.pipeline,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline,
        context_parallel_size=layout.context,
        expert_model_parallel_size=layout.expert,
        expert_tensor_parallel_size=layout.expert_tensor_size,
        distributed_timeout_minutes=timeout_minutes,
        create_gloo_process_groups=gloo_groups,
    )
