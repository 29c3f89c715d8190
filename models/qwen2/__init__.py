"""Qwen2 / Qwen2.5 on megatron-core, bound together in one place:

- `arch`: `Qwen2Arch`, the architecture read from an HF config (the one source of model facts);
- `model`: TransformerConfig, layer spec and GPTModel for an arch;
- `state_dict_adapter`: the declarative HF <-> megatron-core parameter mapping, both directions;
- `flops`: model FLOPs with attention counted per conversation.

`FAMILY` binds them for models/registry.py: outside its own tests, nothing else imports this package.
"""

from models.registry import ModelFamily

from . import flops
from .arch import Qwen2Arch
from .model import build_model, layer_spec, transformer_config
from .state_dict_adapter import bound_mappings, extra_state_objects

FAMILY = ModelFamily(
    name="Qwen2 / Qwen2.5",
    model_type=Qwen2Arch.MODEL_TYPE,
    hf_model_class="Qwen2ForCausalLM",
    hf_config_class="Qwen2Config",
    arch_from_hf_config=Qwen2Arch.from_hf_config,
    transformer_config=transformer_config,
    layer_spec=layer_spec,
    build_model=build_model,
    bound_mappings=bound_mappings,
    extra_state_objects=extra_state_objects,
    layer_parameters=flops.layer_parameters,
    dense_flops_per_token=flops.dense_flops_per_token,
    attention_flops=flops.attention_flops,
    training_flops=flops.training_flops,
)
