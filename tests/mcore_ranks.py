"""Per-rank functions for the megatron-core tests (run through tests/distributed.py)."""

from __future__ import annotations

import torch


def setup_parallel(tensor_parallel: int = 1, pipeline_parallel: int = 1, seed: int = 0) -> None:
    from megatron.core import parallel_state, tensor_parallel as tp

    parallel_state.initialize_model_parallel(tensor_parallel, pipeline_parallel)
    tp.model_parallel_cuda_manual_seed(seed)


def megatron_logits_from_hf(rank: int, world_size: int, hf_dir: str, token_ids: list[list[int]]) -> torch.Tensor:
    """Builds the Qwen2 GPTModel (local spec, TP1/PP1), loads HF weights through the mapping, returns logits."""
    from convert.hf_io import HFSafetensorsReader
    from convert.qwen2.model import Qwen2Arch, build_model, layer_spec, transformer_config
    from convert.qwen2.state_dict_adapter import hf_to_mcore

    setup_parallel()
    arch = Qwen2Arch.from_hf_dir(hf_dir)
    model = build_model(arch, transformer_config(arch, use_cpu_initialization=True), layer_spec(False)).eval()
    reader = HFSafetensorsReader(hf_dir)
    missing, unexpected = model.load_state_dict(dict(hf_to_mcore(arch, reader.read)), strict=False)
    assert not unexpected, unexpected
    assert all(key.endswith("_extra_state") for key in missing), missing
    assert not reader.not_read_exactly_once()
    ids = torch.tensor(token_ids)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model(ids, positions, attention_mask=None)


def resave_at_layout(rank: int, world_size: int, source: str, dest: str, tensor_parallel: int,
                     pipeline_parallel: int) -> None:
    """Loads a torch_dist checkpoint at TPxPP and saves it again through megatron-core, as a trainer at that
    layout would (its full sharded state dict, Transformer Engine extra state included)."""
    import shutil
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from convert.torch_dist import HF_CONFIG_FILE
    from convert.verify import load_model_stage

    model = load_model_stage(source, tensor_parallel, pipeline_parallel, "cpu")
    if rank == 0:
        Path(dest).mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), dest)
    if rank == 0:
        shutil.copy(Path(source) / HF_CONFIG_FILE, Path(dest) / HF_CONFIG_FILE)
