"""Parallel-layout planner: memory per GPU and step time of a model for each feasible layout.

    python tools/plan_layout.py --model /models/Qwen2.5-32B/config.json --seq-length 32768 \\
        --global-batch 512 --gpus 256 --gpu-memory-gb 80

The model, stated so it can be checked (every figure is per GPU, bytes unless noted):

Parameters. A layer holds qkv h(n+2g)d + bias (n+2g)d, proj n d h, MLP 3 h f, two norms 2h; the
embedding and the output layer hold V h each (one when tied). A rank holds L/PP layers split over
TP, plus the embedding on the first stage and the output layer and final norm on the last (with tied
embeddings and PP > 1 the last stage holds a copy of the embedding as its output layer). With a mixture
of E experts of width f_e, the MLP is a router h E and the experts E 3 h f_e, which expert and
expert-tensor parallelism split (/ EP x ETP) instead of TP.

Memory is estimated for the first and the last pipeline stage (one stage at PP = 1), which differ; the
heavier one decides whether a layout fits. The model is that of the dry run (sft/dry_run/), which
measures the real construction code on fake tensors, and the tests hold the two together. Mixed
precision, megatron-core distributed optimizer, Transformer Engine's kernels (the torch layers' figures
where they differ, in brackets):
- weights: 2 bytes per local parameter (bf16);
- grads: 4 bytes per local parameter (fp32 gradient buffer, grad_reduce_in_fp32);
- optimizer: 12 bytes per local parameter / (DP x CP) (fp32 main weights, Adam moments, sharded over
  the data- and context-parallel replicas of the rank's parameters: megatron-core's intra_dp_cp group);
  an expert's over its expert-data-parallel replicas, world / (PP x EP x ETP);
- activations: per token and layer, the tensors the backward pass keeps (bf16): the two norms' inputs and
  outputs 4h [norms and residuals 6h]; with q = n d the query width: q/k/v before and q/k after RoPE 2q +
  3gd, attention output q (flash attention keeps no s^2 scores) [with CP, the all-gather attention's
  copies of the keys and values it attends, (2 CP + 1) g d], and where the family norms each query
  and key head (Qwen3) those norms' inputs q + gd; the MLP's fc1 output 2f and the fused SwiGLU's output
  f: 3f [the unfused SwiGLU's gate activation too: 4f]; in fp32, each norm's reciprocal RMS (per token;
  per q/k head for Qwen3's) and the attention's logsumexp per head. Tensor parallelism divides the parts
  inside the TP region (all but the norms' tensors, which sequence parallelism divides too).
  Recomputation: `selective` (megatron-core's core_attn) keeps q, k, v and the output as they are (inputs
  of the recomputed attention and of the projection) and drops only the logsumexp, and re-runs the
  attention forward; `mlp` drops the MLP's 3f and re-runs its forward; `full` keeps only each layer's
  input (2h, / TP with SP) and re-runs every layer's forward. The last stage also keeps the final norm's
  input and output. Tokens per micro-batch = micro_batch x seq / CP. Under 1F1B pipeline rank r keeps the
  activations of PP - r micro-batches of its L/PP layers at its peak (the first stage PP, the last one);
  interleaved, 2 (PP - r - 1) + (VP - 1) PP + 1 model chunks of L/(PP VP) layers (the first stage PP +
  (PP - 1)/VP micro-batches' worth, the last (VP - 1) + 1/VP), never more than the step's micro-batches.
  A stage's output is freed once sent (deallocate_pipeline_outputs). A mixture of experts keeps, per
  token, instead of the MLP's: the router's fp32 probabilities 4E, and for each of its k experts the
  dispatched input h and the expert's fc1 output and SwiGLU output 3 f_e / ETP, with the routing
  balanced (each expert gets its share k/E of the tokens: dropless routing can load one expert more).
- logits: the last stage keeps the vocabulary-parallel logits, tokens x V / TP x 2 bytes (TE's
  cross-entropy writes their gradient into them) [x 6: megatron-core's cross-entropy adds an fp32 copy;
  4 in an fp32 run];
- other: one placeholder weight gradient per weight shape (a layer's weights / TP, and the output
  layer's on the last stage, bf16: TE keeps them), and the backward's largest transients, the MLP's
  input gradients (3f / TP per token); with full recomputation, the recomputed layer's full set too;
- buffers: a fixed allowance for the CUDA context, NCCL and allocator fragmentation
  (`--buffer-gb`, default the BUFFER_ALLOWANCE_GB below).

Layouts are `plan.layout.ParallelLayout`s, valid by the same rules the trainer's configuration
is checked with, each paired with a recomputation setting.

Step time: the executed FLOPs (model FLOPs of models/decoder/flops.py at the data's conversation
lengths, --mean-conversation, on every token of the rows, padding included, plus what recomputation
re-runs) divided by GPUs x peak x the GEMM efficiency (--efficiency, default 0.6 of peak), plus the
pipeline bubble (PP - 1) / (VP x micro-batches per step), plus exposed communication: tensor parallel
all-gathers/reduce-scatters (all-reduces without SP) of the activations, 4 per layer and micro-batch
over NVLink (--nvlink-gbps, bus bandwidth), not hidden (the trainer does not turn on TE's TP overlap);
the distributed optimizer's reduce-scatter of the fp32 gradients and all-gather of the bf16 weights
over the DP x CP replicas, over NVLink when TP x CP x DP fits a node, else the inter-node network
(--network-gbps per GPU), not overlapped (the trainer does not overlap them yet);
context parallelism's ring exchange of each TP rank's K/V shard (forward) and of K/V and their
gradients (backward), (CP - 1) chunks per layer [the all-gather of K/V and the reduce-scatter of their
gradients: 2 (CP - 1)], half hidden, over NVLink when TP x CP fits a node;
pipeline sends of activations and their gradients at the PP x VP - 1 stage boundaries (a rank takes
part in 1/PP of them), half hidden, over the network; with experts, the token dispatcher's all-to-alls,
dispatch and combine forward and backward, k h bf16 per token and layer each, (EP - 1) / EP of it
leaving the rank, not hidden, over NVLink when EP x ETP fits a node.
MFU = model FLOPs of the real tokens (fill x seq: --packing-fill, the data's packing efficiency) /
(step time x GPUs x peak).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

from common.devices import RECIPE_ACCELERATOR
from models.registry import family_of
from plan.layout import ParallelLayout

GB = 1e9

# What a GPU loses besides tensors, kept free of its memory (the planner's buffers, the dry run's allowance)
BUFFER_ALLOWANCE_GB = {"CUDA context": 1.0, "NCCL buffers": 2.0, "allocator fragmentation": 3.0}


@dataclass(frozen=True)
class Hardware:
    gpus: int
    gpu_memory_gb: float = 80.0
    peak_tflops: float = RECIPE_ACCELERATOR.bf16_dense_tflops
    efficiency: float = 0.6
    nvlink_gbps: float = 360.0  # bus bandwidth of NCCL all-reduce within a node of 8 H100s
    network_gbps: float = 45.0  # per GPU, 400 Gb/s InfiniBand
    gpus_per_node: int = 8
    buffer_gb: float = sum(BUFFER_ALLOWANCE_GB.values())


@dataclass
class Estimate:
    layout: ParallelLayout
    recompute: str  # one of RECOMPUTE
    data_parallel: int
    memory_gb: dict[str, float] = field(default_factory=dict)  # the heaviest stage's parts
    step_time_s: float = 0.0
    mfu: float = 0.0
    fits: bool = False
    # per pipeline stage ("first", "last"; "only" at PP = 1): its memory parts
    stage_memory_gb: dict[str, dict[str, float]] = field(default_factory=dict)
    heaviest_stage: str = "only"
    memory_limit_gb: float = 80.0  # the device's memory

    @property
    def total_gb(self) -> float:
        return sum(self.memory_gb.values())

    def to_dict(self) -> dict:
        return {
            **asdict(self.layout),
            "recompute": self.recompute,
            "data_parallel": self.data_parallel,
            "memory_gb": _rounded(self.memory_gb),
            "total_gb": round(self.total_gb, 3),
            "heaviest_stage": self.heaviest_stage,
            "stage_memory_gb": {stage: _rounded(parts) for stage, parts in self.stage_memory_gb.items()},
            "step_time_s": self.step_time_s,
            "mfu": self.mfu,
            "fits": self.fits,
        }


def _rounded(parts: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in parts.items()}


# The pipeline stages estimated: name -> (holds the embedding, holds the output layer and the loss)
STAGES = {"first": (True, False), "last": (False, True)}
ONLY_STAGE = {"only": (True, True)}


def pipeline_stages(layout: ParallelLayout) -> dict[str, tuple[bool, bool]]:
    return STAGES if layout.pipeline > 1 else ONLY_STAGE


def stage_parameters(arch, layout: ParallelLayout, first: bool, last: bool) -> int:
    """Parameters on one rank of a stage: its layers plus the embedding (first stage) or the output layer
    and the final norm (last stage); with tied embeddings one matrix serves both."""
    return sum(stage_parameter_parts(arch, layout, first, last))


def stage_parameter_parts(arch, layout: ParallelLayout, first: bool, last: bool) -> tuple[int, int]:
    """(parameters split over TP, experts' parameters split over EP x ETP) on one rank of a stage."""
    family = family_of(arch)
    vocab = arch.vocab_size * arch.hidden_size
    matrices = 1 if first and last and arch.tie_word_embeddings else first + last
    layers = arch.num_layers // layout.pipeline
    experts = layers * family.expert_parameters(arch)
    dense = layers * family.layer_parameters(arch) - experts
    return (
        (dense + matrices * vocab) // layout.tensor + (arch.hidden_size if last else 0),
        experts // (layout.expert * layout.expert_tensor_size),
    )


def local_parameters(arch, layout: ParallelLayout) -> int:
    """Parameters on the rank that holds the most: the last stage's (the final norm tips it)."""
    return stage_parameters(arch, layout, first=layout.pipeline == 1, last=True)


def micro_batches_in_flight(layout: ParallelLayout, micro_batches: int, first: bool) -> float:
    """Micro-batches whose activations of all the rank's layers a stage keeps at its peak under 1F1B
    (interleaved: model chunks in flight / VP); the first stage is pipeline rank 0, the last PP - 1."""
    pp, vp = layout.pipeline, layout.virtual_stages
    rank = 0 if first else pp - 1
    if vp == 1:
        return min(pp - rank, micro_batches)
    return min(2 * (pp - rank - 1) + (vp - 1) * pp + 1, micro_batches * vp) / vp


RECOMPUTE = ("none", "selective", "mlp", "full")  # selective = megatron-core's core_attn


def recompute_mode(recompute: str, modules: list[str] | None) -> str | None:
    """The one of RECOMPUTE a trainer configuration (model.recompute, model.recompute_modules) is, or
    None for one the planner does not model (the norms, or several modules); `mlp` is the MLP's
    recomputation, a dense MLP's (megatron-core's mlp) or a mixture of experts' layer (its moe)."""
    if recompute != "selective":
        return recompute
    return {("core_attn",): "selective", ("mlp",): "mlp", ("moe",): "mlp"}.get(
        tuple(modules or ["core_attn"])
    )


def recompute_overrides(recompute: str, arch=None) -> str:
    """The trainer configuration for one of RECOMPUTE (for `arch`: a mixture of experts recomputes its
    MoE layer as megatron-core's moe module)."""
    if recompute == "mlp":
        module = "moe" if getattr(arch, "moe", None) else "mlp"
        return f"model.recompute=selective model.recompute_modules=[{module}]"
    return f"model.recompute={recompute}"


def activation_bytes_per_token_layer(
    arch, layout: ParallelLayout, recompute: str, element_bytes: int = 2, fused: bool = True
) -> float:
    """Bytes a layer keeps per token (of this rank's share of the row) for its backward; `fused`: with
    Transformer Engine's kernels, else megatron-core's torch layers (see the module doc)."""
    h, g, d, f = arch.hidden_size, arch.num_query_groups, arch.head_dim, arch.ffn_hidden_size
    n, t = arch.num_attention_heads, layout.tensor
    q, sp = n * d, t if layout.sequence_parallel else 1
    if recompute == "full":
        return element_bytes * h / sp
    replicated = (4 if fused else 6) * h  # the two norms' inputs and outputs (and residuals unfused)
    attention = 3 * q + 3 * g * d  # q/k/v, RoPE'd q/k, attention output
    if arch.qk_layernorm:  # the per-head q/k norms keep their inputs (the heads copied out of q/k/v)
        attention += q + g * d
    if not fused and layout.context > 1 and recompute != "selective":
        # the all-gather attention's keys and values, each query chunk's conversation prefix copied out
        # for the kernel: (2 CP + 1) / 2 local tokens' worth of each (models/packed_attention.py)
        attention += (2 * layout.context + 1) * g * d
    moe = getattr(arch, "moe", None)
    dense_mlp = 0 if recompute == "mlp" or moe else (3 if fused else 4) * f
    # per token: its k dispatched copies, each expert's fc1 and SwiGLU outputs (split over ETP, not TP)
    expert_mlp = 0.0
    if moe is not None and recompute != "mlp":
        expert_mlp = moe.experts_per_token * (h + 3 * moe.expert_ffn_hidden_size / layout.expert_tensor_size)
    fp32 = 0.0
    if fused:  # the norms' reciprocal RMS per token (and per q/k head), flash attention's logsumexp per head
        fp32 = 2 * 4 / sp + (0 if recompute == "selective" else 4 * n / t)
        if arch.qk_layernorm:
            fp32 += 4 * (n + g) / t
    if moe is not None:  # the router's probabilities over all experts
        fp32 += 4 * moe.num_experts / sp
    return element_bytes * (replicated / sp + (attention + dense_mlp) / t + expert_mlp) + fp32


def estimate(
    arch,
    layout: ParallelLayout,
    recompute: str,
    hw: Hardware,
    seq_length: int,
    global_batch: int,
    mean_conversation: float,
    weight_bytes: int = 2,
    te_available: bool = True,
    fill: float = 1.0,
) -> Estimate | None:
    """The estimate for one layout, or None when the layout is not valid for the model and batch;
    `fill` is the fraction of row tokens that are real (the data's packing efficiency)."""
    if layout.problems(
        world_size=hw.gpus,
        arch=arch,
        global_batch=global_batch,
        seq_length=seq_length,
    ):
        return None
    dp = layout.data_parallel(hw.gpus)
    micro_batches = layout.micro_batches_per_step(global_batch, hw.gpus)
    stages = {
        name: _stage_memory(
            arch, layout, recompute, hw, seq_length, micro_batches, dp, weight_bytes, te_available, *ends
        )
        for name, ends in pipeline_stages(layout).items()
    }
    heaviest = max(stages, key=lambda name: sum(stages[name].values()))
    result = Estimate(
        layout,
        recompute,
        dp,
        stages[heaviest],
        stage_memory_gb=stages,
        heaviest_stage=heaviest,
        memory_limit_gb=hw.gpu_memory_gb,
    )
    result.fits = result.total_gb <= hw.gpu_memory_gb
    run = _Run(arch, layout, recompute, hw, seq_length, global_batch, mean_conversation, micro_batches, dp)
    result.step_time_s, result.mfu = _step_time(run, local_parameters(arch, layout), fill, te_available)
    return result


def _stage_memory(
    arch, layout, recompute, hw, seq_length, micro_batches, dp, weight_bytes, fused, first: bool, last: bool
) -> dict[str, float]:
    """GB per part on one rank of the stage holding the embedding (`first`) and/or the output (`last`)."""
    dense_params, expert_params = stage_parameter_parts(arch, layout, first, last)
    params = dense_params + expert_params
    expert_replicas = hw.gpus // (layout.pipeline * layout.expert * layout.expert_tensor_size)
    tokens = layout.micro_batch_size * seq_length / layout.context
    per_token_layer = activation_bytes_per_token_layer(arch, layout, recompute, weight_bytes, fused)
    one_layer = tokens * activation_bytes_per_token_layer(arch, layout, "none", weight_bytes, fused)
    layers_here = arch.num_layers // layout.pipeline
    in_flight = micro_batches_in_flight(layout, micro_batches, first)
    activations = tokens * layers_here * in_flight * per_token_layer
    sp = layout.tensor if layout.sequence_parallel else 1
    if last:  # the final norm's input and output (and its fp32 reciprocal RMS)
        activations += (
            tokens
            * micro_batches_in_flight(layout, micro_batches, first=False)
            * (2 * weight_bytes * arch.hidden_size + (4 if fused else 0))
            / sp
        )
    vocab_shard = arch.vocab_size / layout.tensor
    if fused:  # TE's cross-entropy keeps the logits and writes their gradient into them
        logit_bytes = weight_bytes
    else:  # the logits and megatron-core's fp32 copy; in fp32 the cross-entropy works in place
        logit_bytes = weight_bytes + 4 if weight_bytes == 2 else 4
    logits = tokens * vocab_shard * logit_bytes if last else 0.0
    # One placeholder weight gradient per weight shape (TE keeps them; megatron-core's torch layers make
    # them anew), and the backward's largest transients: the MLP's input gradients (fc2's input and the
    # SwiGLU's, 3f per token). With full recomputation, the layer being recomputed holds its full set.
    family = family_of(arch)
    experts = family.expert_parameters(arch)
    placeholders = weight_bytes * (
        (family.layer_parameters(arch) - experts) / layout.tensor
        + experts / (layout.expert * layout.expert_tensor_size)
        + (vocab_shard * arch.hidden_size if last else 0)
    )
    moe = getattr(arch, "moe", None)
    width = (
        moe.experts_per_token * moe.expert_ffn_hidden_size / layout.expert_tensor_size
        if moe
        else arch.ffn_hidden_size / layout.tensor
    )
    transients = tokens * weight_bytes * 3 * width
    other = placeholders + transients + (one_layer if recompute == "full" else 0)
    optimizer_bytes = 12 if weight_bytes == 2 else 8  # fp32 main weights (bf16 only) and Adam moments
    memory = {
        "weights": weight_bytes * params / GB,
        "grads": 4 * params / GB,
        "optimizer": optimizer_bytes
        * (dense_params / (dp * layout.context) + expert_params / expert_replicas)
        / GB,
        "activations": activations / GB,
        "logits": logits / GB,
        "other": other / GB,
        "buffers": hw.buffer_gb,
    }
    return memory


@dataclass(frozen=True)
class _Run:
    """The step a layout's time is estimated for."""

    arch: Any
    layout: ParallelLayout
    recompute: str
    hw: Hardware
    seq_length: int
    global_batch: int
    mean_conversation: float
    micro_batches: int
    dp: int


def _step_time(run: _Run, params: int, fill: float, fused: bool) -> tuple[float, float]:
    """(seconds per step, MFU) of `run` for a rank of `params` parameters; `fill`: the real tokens'
    fraction of a row; `fused`: Transformer Engine's kernels."""
    arch, layout, recompute, hw = run.arch, run.layout, run.recompute, run.hw
    seq_length, global_batch, micro_batches = run.seq_length, run.global_batch, run.micro_batches
    mean_conversation, dp = run.mean_conversation, run.dp
    real = fill * seq_length
    conversations = [mean_conversation] * max(1, round(real / mean_conversation))
    family = family_of(arch)
    forward_attention = family.attention_flops(arch, conversations)
    dense_per_token = family.dense_flops_per_token(arch)
    model_flops = 3 * (dense_per_token * real + forward_attention) * global_batch
    forward = dense_per_token * seq_length + forward_attention  # padding runs through the GEMMs
    rerun = {
        "none": 0.0,
        "selective": forward_attention,
        "mlp": 2 * family.mlp_matrix_parameters(arch, active=True) * arch.num_layers * seq_length,
        "full": forward,
    }[recompute]
    executed = (3 * forward + rerun) * global_batch
    compute = executed / (hw.gpus * hw.peak_tflops * 1e12 * hw.efficiency)
    bubble = (layout.pipeline - 1) / (layout.virtual_stages * micro_batches)
    tp_time = 0.0
    if layout.tensor > 1:
        tokens = layout.micro_batch_size * seq_length / layout.context
        per_collective = tokens * arch.hidden_size * 2 * 2 * (layout.tensor - 1) / layout.tensor
        tp_bytes = 4 * (arch.num_layers // layout.pipeline) * micro_batches * per_collective
        tp_time = tp_bytes / (hw.nvlink_gbps * GB)  # exposed: TE's TP overlap is not turned on
    cp_time = 0.0
    if layout.context > 1:  # ring exchange of K/V (forward) and K/V + their gradients (backward), per layer
        tokens = layout.micro_batch_size * seq_length / layout.context
        kv_bytes = (
            tokens * 2 * arch.num_query_groups * arch.head_dim * 2 / layout.tensor
        )  # this TP rank's heads
        exchanges = (3 if fused else 2) * (layout.context - 1)
        cp_bytes = exchanges * kv_bytes * (arch.num_layers // layout.pipeline) * micro_batches
        intra_node = layout.tensor * layout.context <= hw.gpus_per_node
        cp_time = 0.5 * cp_bytes / ((hw.nvlink_gbps if intra_node else hw.network_gbps) * GB)  # half hidden
    pp_time = 0.0
    if layout.pipeline > 1:  # activations forward and their gradients backward at each of the PP x VP stage
        tokens = layout.micro_batch_size * seq_length / layout.context  # boundaries, per micro-batch
        pp_bytes = 2 * tokens * arch.hidden_size * 2 / (layout.tensor if layout.sequence_parallel else 1)
        hops = layout.pipeline * layout.virtual_stages - 1
        pp_time = (
            0.5 * pp_bytes * hops * micro_batches / layout.pipeline / (hw.network_gbps * GB)
        )  # half hidden
    dp_time = gradient_sync_seconds(layout, dp, params, hw)
    ep_time = expert_dispatch_seconds(arch, layout, seq_length, micro_batches, hw)
    step = compute * (1 + bubble) + tp_time + cp_time + pp_time + dp_time + ep_time
    return round(step, 3), round(model_flops / (step * hw.gpus * hw.peak_tflops * 1e12), 4)


def expert_dispatch_seconds(
    arch, layout: ParallelLayout, seq_length: int, micro_batches: int, hw: Hardware
) -> float:
    """The token dispatcher's all-to-alls per step (none without expert parallelism): dispatch and combine
    in the forward and again in the backward, per layer and micro-batch, each moving the rank's tokens'
    k copies of h in bf16, (EP - 1) / EP of them to other ranks; not hidden. The expert-parallel ranks
    lie within EP x ETP consecutive ones (megatron-core's expert rank order tp-ep-dp-pp): NVLink when
    that fits a node, else the network."""
    moe = getattr(arch, "moe", None)
    if moe is None or layout.expert == 1:
        return 0.0
    tokens = layout.micro_batch_size * seq_length / layout.context
    one = tokens * moe.experts_per_token * arch.hidden_size * 2 * (layout.expert - 1) / layout.expert
    total = 4 * one * (arch.num_layers // layout.pipeline) * micro_batches
    intra_node = layout.expert * layout.expert_tensor_size <= hw.gpus_per_node
    return total / ((hw.nvlink_gbps if intra_node else hw.network_gbps) * GB)


def gradient_sync_seconds(layout: ParallelLayout, dp: int, params: int, hw: Hardware) -> float:
    """The distributed optimizer's exchange per step: reduce-scatter of the fp32 gradients and all-gather
    of the bf16 weights, each a ring over the DP x CP ranks that hold replicas of the rank's parameters.
    With megatron-core's rank order (tp-cp-ep-dp-pp) those ranks lie within TP x CP x DP consecutive
    ones: NVLink when that fits a node, else the network."""
    replicas = dp * layout.context
    if replicas == 1:
        return 0.0
    intra_node = layout.tensor * layout.context * dp <= hw.gpus_per_node
    bandwidth = (hw.nvlink_gbps if intra_node else hw.network_gbps) * GB
    return (4 + 2) * params * (replicas - 1) / replicas / bandwidth


def plan(
    arch,
    hw: Hardware,
    seq_length: int,
    global_batch: int,
    mean_conversation: float,
    te_available: bool = True,
    fill: float = 1.0,
) -> list[Estimate]:
    """Every valid layout, feasible ones first, fastest first."""
    results = []
    moe = getattr(arch, "moe", None)
    experts = [e for e in (1, 2, 4, 8, 16, 32, 64) if moe and moe.num_experts % e == 0] or [1]
    grid = itertools.product(
        (1, 2, 4, 8),
        (1, 2, 4, 8, 16),
        (None, 2, 4),
        (1, 2, 4, 8),
        RECOMPUTE,
        (1, 2),
        (False, True),
        experts,
        (None, 1) if moe else (None,),  # expert-tensor: as TP, or 1 (the experts whole on each rank)
    )
    for tensor, pipeline, virtual, context, recompute, micro_batch, sp, expert, expert_tensor in grid:
        if sp and tensor == 1:  # sequence parallelism splits along the tensor-parallel ranks
            continue
        if expert_tensor == 1 and tensor == 1:  # the same layout as ETP = TP
            continue
        layout = ParallelLayout(tensor, pipeline, virtual, context, sp, micro_batch, expert, expert_tensor)
        found = estimate(
            arch,
            layout,
            recompute,
            hw,
            seq_length,
            global_batch,
            mean_conversation,
            te_available=te_available,
            fill=fill,
        )
        if found is not None:
            results.append(found)
    results.sort(key=lambda e: (not e.fits, e.step_time_s, e.total_gb))
    return results


HEADROOM = 0.1  # of the device's memory, left unused by a recommended layout


def recommend(feasible: list[Estimate], within: float = 0.01, headroom: float = HEADROOM) -> Estimate:
    """Among the feasible layouts that leave `headroom` of the device's memory unused (all feasible ones
    when none does), those whose step time is within `within` of the fastest, the one with the most
    memory to spare: the model's step times are not accurate to 1%, and how much the allocator loses to
    fragmentation at these shapes is unmeasured (the buffers are an allowance), while running out of
    memory is certain."""
    roomy = [e for e in feasible if e.total_gb <= (1 - headroom) * e.memory_limit_gb]
    candidates = roomy or feasible
    fastest = min(e.step_time_s for e in candidates)
    return min((e for e in candidates if e.step_time_s <= fastest * (1 + within)), key=lambda e: e.total_gb)


def format_table(estimates: list[Estimate], limit: int = 15) -> str:
    experts = any(e.layout.expert > 1 or e.layout.expert_tensor for e in estimates)
    header = (
        f"{'TP':>3} {'PP':>3} {'VP':>3} {'CP':>3} {'SP':>3} {'recompute':>9} {'mb':>3} {'DP':>4} "
        + (f"{'EP':>3} {'ETP':>3} " if experts else "")
        + "| "
        f"{'stage':>5} {'weights':>7} {'grads':>6} {'optim':>6} {'activ':>6} {'logits':>6} {'other':>6} "
        f"{'buffers':>7} "
        f"{'total':>6} GB | "
        f"{'step s':>7} {'MFU':>6}"
    )
    rows = [header, "-" * len(header)]
    for e in estimates[:limit]:
        lay, m = e.layout, e.memory_gb
        rows.append(
            f"{lay.tensor:>3} {lay.pipeline:>3} {lay.virtual_stages:>3} {lay.context:>3} "
            f"{'y' if lay.sequence_parallel else 'n':>3} {e.recompute:>9} {lay.micro_batch_size:>3} "
            f"{e.data_parallel:>4} "
            + (f"{lay.expert:>3} {lay.expert_tensor_size:>3} " if experts else "")
            + f"| {e.heaviest_stage:>5} {m['weights']:>7.1f} "
            f"{m['grads']:>6.1f} {m['optimizer']:>6.1f} {m['activations']:>6.1f} {m['logits']:>6.1f} "
            f"{m['other']:>6.1f} {m['buffers']:>7.1f} {e.total_gb:>6.1f}    | "
            f"{e.step_time_s:>7.1f} {100 * e.mfu:>5.1f}%" + ("" if e.fits else "  (does not fit)")
        )
    return "\n".join(rows)


def format_stages(estimate: Estimate) -> str:
    """One line per pipeline stage of an estimate: its total and parts, GB per GPU."""
    lines = []
    for stage, parts in estimate.stage_memory_gb.items():
        split = ", ".join(f"{name} {value:.1f}" for name, value in parts.items())
        lines.append(f"  {stage} stage: {sum(parts.values()):.1f} GB per GPU ({split})")
    return "\n".join(lines)
