"""Qwen3 MoE (`model_type` qwen3_moe: Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (an RMSNorm on
each query and key head, explicit `head_dim`, no biases) with every layer's MLP a mixture of SwiGLU
experts: `num_experts` experts of width `moe_intermediate_size`, `num_experts_per_tok` chosen per token by
a linear router (`mlp.gate`), their probabilities renormalised over the chosen ones where
`norm_topk_prob`. No shared expert, no capacity factor.

Refused, naming the field: dense layers among the sparse ones (`decoder_sparse_step` other than 1, a
non-empty `mlp_only_layers`), sliding windows, attention biases, rope scaling. The router's auxiliary
load-balancing loss is the trainer's choice (`model.moe_aux_loss_coef`), not the checkpoint's
(`router_aux_loss_coef` is what transformers adds only when asked to output router logits).
`FAMILY` binds it for models/registry.py.
"""

from __future__ import annotations

from typing import Any

from common.errors import UnsupportedModelError
from models.decoder import DecoderArch, decoder_family
from models.decoder.arch import (
    MixtureOfExperts,
    check_architectures,
    read_decoder_config,
    refuse_rope_scaling,
    refuse_sliding_window,
    refuse_true,
)

NAME = "Qwen3 MoE"
MODEL_TYPE = "qwen3_moe"
ARCHITECTURES = ("Qwen3MoeForCausalLM",)
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size")


def read_experts(config: dict[str, Any], source: str) -> MixtureOfExperts:
    # The hub's configs say num_experts; transformers 5 writes the same value as num_local_experts.
    fields = {name: config.get(name) for name in MOE_FIELDS}
    fields["num_experts"] = fields["num_experts"] or config.get("num_local_experts")
    missing = [name for name, value in fields.items() if not value]
    if missing:
        raise UnsupportedModelError(f"{source}: no {', '.join(missing)}; a {NAME} config names {MOE_FIELDS}")
    if config.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError(
            f"{source}: decoder_sparse_step={config['decoder_sparse_step']}; only a mixture of experts in "
            "every layer (decoder_sparse_step 1) is supported"
        )
    if config.get("mlp_only_layers"):
        raise UnsupportedModelError(
            f"{source}: mlp_only_layers={config['mlp_only_layers']}; dense layers among the expert layers "
            "are not supported (mlp_only_layers must be empty)"
        )
    if fields["num_experts_per_tok"] > fields["num_experts"]:
        raise UnsupportedModelError(
            f"{source}: num_experts_per_tok={fields['num_experts_per_tok']} is more than "
            f"num_experts={fields['num_experts']}"
        )
    return MixtureOfExperts(
        num_experts=fields["num_experts"],
        experts_per_token=fields["num_experts_per_tok"],
        expert_ffn_hidden_size=fields["moe_intermediate_size"],
        normalize_top_k=bool(config.get("norm_topk_prob", False)),
    )


def arch_from_hf_config(config: dict[str, Any], source: str = "config.json") -> DecoderArch:
    check_architectures(config, source, MODEL_TYPE, ARCHITECTURES, NAME)
    refuse_sliding_window(config, source)
    refuse_true(config, source, ("attention_bias",), NAME)
    refuse_rope_scaling(config, source, NAME)
    return read_decoder_config(config, source, qk_layernorm=True, moe=read_experts(config, source))


FAMILY = decoder_family(
    name=NAME,
    model_type=MODEL_TYPE,
    hf_model_class=ARCHITECTURES[0],
    hf_config_class="Qwen3MoeConfig",
    chat_templates=("qwen3", "qwen", "AM-thinking"),  # ChatML (<|im_start|>, <|im_end|>)
    arch_from_hf_config=arch_from_hf_config,
)
