"""The dense decoder every family here is (GQA + RoPE + RMSNorm + SwiGLU), on megatron-core:

- `arch`: `DecoderArch`, the architecture read from an HF config (the one source of model facts),
  with the traits that tell the families apart (QKV bias, query/key norms, rope scaling);
- `model`: TransformerConfig, layer spec and GPTModel for an arch;
- `state_dict_adapter`: the declarative HF <-> megatron-core parameter mapping, both directions;
- `flops`: parameters and model FLOPs with attention counted per conversation.

A family package (models/qwen2, models/qwen3, models/llama) reads its config into a `DecoderArch` and
binds it with these through `decoder_family`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.registry import ModelFamily

from . import flops
from .arch import DecoderArch
from .model import build_model, layer_spec, transformer_config
from .state_dict_adapter import bound_mappings, extra_state_objects


def decoder_family(
    *,
    name: str,
    model_type: str,
    hf_model_class: str,
    hf_config_class: str,
    chat_templates: tuple[str, ...],
    arch_from_hf_config: Callable[[dict[str, Any], str], DecoderArch],
) -> ModelFamily:
    """A family that is this decoder: its own config reader and transformers classes, the rest shared."""
    return ModelFamily(
        name=name,
        model_type=model_type,
        hf_model_class=hf_model_class,
        hf_config_class=hf_config_class,
        chat_templates=chat_templates,
        arch_from_hf_config=arch_from_hf_config,
        transformer_config=transformer_config,
        layer_spec=layer_spec,
        build_model=build_model,
        bound_mappings=bound_mappings,
        extra_state_objects=extra_state_objects,
        layer_parameters=flops.layer_parameters,
        expert_parameters=flops.expert_parameters,
        mlp_matrix_parameters=flops.mlp_matrix_parameters,
        dense_flops_per_token=flops.dense_flops_per_token,
        attention_flops=flops.attention_flops,
        training_flops=flops.training_flops,
    )
