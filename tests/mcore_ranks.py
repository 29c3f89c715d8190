"""Per-rank functions for the megatron-core tests (run through common.distributed.run_distributed)."""

from __future__ import annotations

import torch


def setup_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 0) -> None:
    from megatron.core import parallel_state
    from megatron.core import tensor_parallel as tp

    parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    tp.model_parallel_cuda_manual_seed(seed)


def megatron_logits_from_hf(
    rank: int, world_size: int, hf_dir: str, token_ids: list[list[int]]
) -> torch.Tensor:
    """Builds the family's GPTModel (local spec, TP1/PP1), loads HF weights through the mapping, returns
    its logits."""
    model = _model_from_hf(hf_dir).eval()
    ids = torch.tensor(token_ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, attention_mask=None)


def moe_load_balancing_losses_from_hf(
    rank: int, world_size: int, hf_dir: str, token_ids: list[list[int]], coefficient: float
) -> torch.Tensor:
    """megatron-core's load-balancing loss of each layer (without its coefficient, as it logs it) for one
    micro-batch of `token_ids` through the model of `hf_dir`, in training mode, local spec, TP1/PP1."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    model = _model_from_hf(
        hf_dir, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=coefficient
    ).train()
    clear_aux_losses_tracker()
    ids = torch.tensor(token_ids)
    model(ids, torch.arange(ids.shape[1]).expand_as(ids), attention_mask=None)
    return get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"].clone()


def _model_from_hf(hf_dir: str, **config_overrides):
    """The family's GPTModel (local spec, TP1/PP1) with the HF checkpoint's weights through the mapping."""
    from formats.hf_safetensors import HFSafetensorsReader
    from models.backends import choose_backend
    from models.registry import family_of, read_arch
    from testing.mappings import to_mcore

    setup_parallel()
    arch = read_arch(hf_dir)
    family = family_of(arch)
    spec = family.layer_spec(arch, choose_backend("cpu"), packed=False)
    config = family.transformer_config(arch, use_cpu_initialization=True, **config_overrides)
    model = family.build_model(arch, config, spec)
    reader = HFSafetensorsReader(hf_dir)
    weights = {
        m.key: to_mcore(m, [reader.read(key) for key in m.hf_keys]) for m in family.bound_mappings(arch)
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    assert all(key.endswith("_extra_state") for key in missing), missing
    assert not reader.not_read_exactly_once()
    return model


def resave_at_layout(
    rank: int, world_size: int, source: str, dest: str, tensor_parallel: int, pipeline_parallel: int
) -> None:
    """Loads a torch_dist checkpoint at TPxPP and saves it again through megatron-core, as a trainer at that
    layout would (its full sharded state dict, Transformer Engine extra state included)."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from convert.verify import load_model_stage
    from formats.run_files import HF_CONFIG_FILE
    from plan.layout import ParallelLayout

    model = load_model_stage(
        source, ParallelLayout(tensor=tensor_parallel, pipeline=pipeline_parallel), "cpu"
    )
    if rank == 0:
        Path(dest).mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), dest)
    if rank == 0:
        shutil.copy(Path(source) / HF_CONFIG_FILE, Path(dest) / HF_CONFIG_FILE)


def stock_load_matches_ours(
    rank: int,
    world_size: int,
    checkpoint: str,
    tensor_parallel: int,
    pipeline_parallel: int,
    expert_parallel: int = 1,
) -> tuple[int, str | None]:
    """Loads a converted checkpoint with megatron-core's own calls only, as a Megatron-LM user would:
    GPTModel (local spec, with the checkpoint's experts if any) at TP x PP x EP,
    `dist_checkpointing.load(model.sharded_state_dict(), dir)` with its defaults, and a strict
    `load_state_dict`; checks every weight against the project's loader. Returns the number of tensors
    compared and, for a mixture of experts, how the local spec as megatron-core ships it fails: its keys
    map renames the pre-MLP norm to the dense MLP's fused name (`mlp.linear_fc1.layer_norm_weight`),
    which TE's MoE spec does not, so it is loaded without that one entry (TE's name,
    `pre_mlp_layernorm.weight`)."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from torch.distributed.checkpoint.api import CheckpointException

    from convert.verify import load_model_stage
    from models.megatron_settings import expert_settings
    from models.registry import family_of, read_arch
    from plan.layout import ParallelLayout

    layout = ParallelLayout(tensor=tensor_parallel, pipeline=pipeline_parallel, expert=expert_parallel)
    ours = load_model_stage(checkpoint, layout, "cpu")  # initialises TP x PP x EP
    arch = read_arch(checkpoint)
    experts = arch.moe.num_experts if getattr(arch, "moe", None) else None
    config = family_of(arch).transformer_config(
        arch,
        tensor_parallel=tensor_parallel,
        pipeline_parallel=pipeline_parallel,
        use_cpu_initialization=True,
        **expert_settings(arch, expert_parallel, layout.expert_tensor_size, "alltoall"),
    )

    def stock_model(spec):
        return GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=arch.rope_base,
            rope_scaling=arch.rope_scaling is not None,
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
        )

    def spec():
        return get_gpt_layer_local_spec(
            num_experts=experts, qk_layernorm=arch.qk_layernorm, normalization="RMSNorm"
        )

    as_shipped_fails = None
    if experts:
        try:
            dist_checkpointing.load(stock_model(spec()).sharded_state_dict(), checkpoint)
        except CheckpointException as error:  # a BaseException: torch's checkpoint reader raises it
            as_shipped_fails = str(error)
        te_names = spec()
        del te_names.submodules.sharded_state_dict_keys_map["pre_mlp_layernorm."]
        stock = stock_model(te_names)
    else:
        stock = stock_model(spec())
    state = dist_checkpointing.load(stock.sharded_state_dict(), checkpoint)
    stock.load_state_dict(state)  # strict: every key, _extra_state included
    expected = {k: v for k, v in ours.state_dict().items() if isinstance(v, torch.Tensor)}
    got = {k: v for k, v in stock.state_dict().items() if isinstance(v, torch.Tensor)}
    assert got.keys() == expected.keys(), sorted(got.keys() ^ expected.keys())[:5]
    assert all(torch.equal(got[k], expected[k]) for k in got)
    return len(got), as_shipped_fails


def context_parallel_attention_rank(rank: int, world_size: int, lengths: list[int], seed: int) -> dict:
    """This rank's share of a packed row of conversations of `lengths` (each padded to a multiple of
    2 x CP, the world being the context-parallel group) through the all-gather attention: the output and
    the gradients of query, key and value for a fixed weighting of the whole row's output."""
    import torch.distributed as dist

    from models.packed_attention import context_parallel_causal_attention
    from sft.data import context_parallel_indices

    q, k, v, weights, cu = packed_attention_inputs(lengths, 2 * world_size, seed)
    index = torch.from_numpy(context_parallel_indices(cu.numpy(), world_size, rank))
    local = [t.index_select(0, index).requires_grad_() for t in (q, k, v)]
    out = context_parallel_causal_attention(*local, cu, q.shape[-1] ** -0.5, dist.group.WORLD)
    (out * weights.index_select(0, index)).sum().backward()
    return {"index": index, "out": out.detach(), "grads": [t.grad for t in local]}


def packed_attention_inputs(lengths: list[int], pad_multiple: int, seed: int):
    """Random float64 query [T, 4, 8], key and value [T, 2, 8] and output weights for conversations of
    `lengths` padded to `pad_multiple` each, with their padded offsets."""
    import numpy as np

    from formats.packed import padded_lengths

    padded = padded_lengths(np.asarray(lengths), pad_multiple)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(padded)]).astype(np.int32))
    total = int(cu[-1])
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=torch.float64)  # noqa: E731
    return draw(total, 4, 8), draw(total, 2, 8), draw(total, 2, 8), draw(total, 4, 8), cu
