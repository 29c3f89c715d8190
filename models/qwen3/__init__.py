"""Qwen3 dense (`model_type` qwen3): the dense decoder with an RMSNorm on each query and key head and
no biases; `head_dim` is explicit (128, not hidden / heads at several sizes).

Sliding-window attention, attention biases and rope scaling are refused (Qwen3 MoE is its own family,
models/qwen3_moe). `FAMILY` binds it for models/registry.py: outside its own
tests, nothing else imports this package.
"""

from __future__ import annotations

from typing import Any

from models.decoder import DecoderArch, decoder_family
from models.decoder.arch import (
    check_architectures,
    read_decoder_config,
    refuse_rope_scaling,
    refuse_sliding_window,
    refuse_true,
)

NAME = "Qwen3"
MODEL_TYPE = "qwen3"
ARCHITECTURES = ("Qwen3ForCausalLM",)


def arch_from_hf_config(config: dict[str, Any], source: str = "config.json") -> DecoderArch:
    check_architectures(config, source, MODEL_TYPE, ARCHITECTURES, NAME)
    refuse_sliding_window(config, source)
    refuse_true(config, source, ("attention_bias",), NAME)
    refuse_rope_scaling(config, source, NAME)
    return read_decoder_config(config, source, qk_layernorm=True)


FAMILY = decoder_family(
    name=NAME,
    model_type=MODEL_TYPE,
    hf_model_class=ARCHITECTURES[0],
    hf_config_class="Qwen3Config",
    chat_templates=("qwen3", "qwen", "AM-thinking"),  # ChatML (<|im_start|>, <|im_end|>)
    arch_from_hf_config=arch_from_hf_config,
)
