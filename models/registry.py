"""The model families, looked up by the Hugging Face `model_type` of a checkpoint's config.json.

This is the one place that knows which families exist. Trainer, converters, verifier, planner, dry run
and GPU benchmark ask it for a family (`family_for_config`, `family_of`) or an architecture (`read_arch`)
and use what the family provides; none imports a family package. A family is a package under
`models/` whose `FAMILY` is a `ModelFamily`; adding one is that package plus a line in `_PACKAGES`
(docs/architecture.md). The dense families share one decoder (models/decoder) and differ in their
config reader.

    arch = read_arch("/models/Qwen2.5-32B")        # config.json -> the family's architecture
    family = family_of(arch)
    config = family.transformer_config(arch, tensor_parallel=8)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import UnsupportedModelError
from models.hf_config import read_hf_config

# A family's architecture: a frozen dataclass read from config.json (e.g. models.decoder.arch.DecoderArch)
# whose `model_type` names its family.
Arch = Any

# model_type -> the package whose FAMILY reads it (imported on first use)
_PACKAGES = {
    "qwen2": "models.qwen2",
    "qwen3": "models.qwen3",
    "qwen3_moe": "models.qwen3_moe",
    "llama": "models.llama",
}
# model types users ask for that are known and not supported yet, with what to use instead
_NOT_YET = {
    "qwen2_moe": "Qwen2 MoE is not supported yet; the dense Qwen2/2.5 models (model_type qwen2) and Qwen3 "
    "MoE (qwen3_moe) are",
}


@dataclass(frozen=True)
class ModelFamily:
    """Everything family-specific, for the code that builds, converts, plans and exports a model."""

    name: str  # for messages, e.g. "Qwen2 / Qwen2.5"
    model_type: str  # config.json's model_type
    hf_model_class: str  # the transformers class of its checkpoints and of the release
    hf_config_class: str  # the transformers config class written at export
    # The chat templates (formats.chat_template names) written in this family's special tokens: data
    # encoded with another is refused by the trainer.
    chat_templates: tuple[str, ...]
    # (config dict, source name) -> the family's architecture, validated
    arch_from_hf_config: Callable[..., Arch]
    # (arch, tensor_parallel=, pipeline_parallel=, params_dtype=, **overrides) -> TransformerConfig
    transformer_config: Callable[..., Any]
    # (arch, backend, packed=) -> the megatron-core layer spec
    layer_spec: Callable[..., Any]
    # (arch, config, spec, pre_process=, post_process=, vp_stage=) -> this rank's GPTModel stage
    build_model: Callable[..., Any]
    # (arch, layer_names) -> the HF <-> megatron-core tensor mapping, in forward order
    bound_mappings: Callable[..., list]
    # arch -> the `_extra_state` keys a complete torch_dist checkpoint holds
    extra_state_objects: Callable[[Arch], dict[str, None]]
    # arch -> the parameters of one transformer layer
    layer_parameters: Callable[[Arch], int]
    # arch -> the parameters of one layer's experts (0 for a dense model)
    expert_parameters: Callable[[Arch], int]
    # (arch, active) -> one layer's MLP weights (with experts: the router and all of them, or the chosen)
    mlp_matrix_parameters: Callable[..., int]
    # arch -> forward FLOPs per token outside the attention scores
    dense_flops_per_token: Callable[[Arch], float]
    # (arch, conversation lengths) -> forward FLOPs of the attention scores
    attention_flops: Callable[[Arch, Any], float]
    # (arch, conversation lengths) -> model FLOPs of forward + backward
    training_flops: Callable[[Arch, Any], float]


def supported_model_types() -> tuple[str, ...]:
    return tuple(_PACKAGES)


def family_for_config(config: dict[str, Any], source: str = "config.json") -> ModelFamily:
    """The family of an HF config, or UnsupportedModelError naming its model_type and those supported."""
    model_type = config.get("model_type")
    if model_type not in _PACKAGES:
        hint = f"{_NOT_YET[model_type]}; " if model_type in _NOT_YET else ""
        raise UnsupportedModelError(
            f"{source}: model_type={model_type!r}, architectures={config.get('architectures') or []}; "
            f"{hint}the supported model types are {', '.join(_PACKAGES)} ({', '.join(_names())})"
        )
    return _family(model_type)


def family_of(arch: Arch) -> ModelFamily:
    """The family an architecture object (from `read_arch` or a family's arch_from_hf_config) belongs to."""
    return _family(arch.model_type)


def arch_from_config(config: dict[str, Any], source: str = "config.json") -> Arch:
    """The architecture of an HF config dict, read and validated by its family."""
    return family_for_config(config, source).arch_from_hf_config(config, source)


def read_arch(path: str | Path) -> Arch:
    """The architecture of a config.json file, an HF model directory or a checkpoint of this project."""
    config, config_file = read_hf_config(path)
    return arch_from_config(config, str(config_file))


def _family(model_type: str) -> ModelFamily:
    return importlib.import_module(_PACKAGES[model_type]).FAMILY


def _names() -> list[str]:
    return [_family(model_type).name for model_type in _PACKAGES]
