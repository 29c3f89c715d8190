"""Qwen2 / Qwen2.5 (`model_type` qwen2): the dense decoder with a bias on the QKV projection.

Every size (0.5B-72B; tied embeddings on the small ones; vocabulary 151,936 or 152,064) reads from its
config.json; sliding-window attention and rope scaling are refused. `FAMILY` binds it for
models/registry.py: outside its own tests, nothing else imports this package.
"""

from __future__ import annotations

from typing import Any

from models.decoder import DecoderArch, decoder_family
from models.decoder.arch import (
    check_architectures,
    read_decoder_config,
    refuse_rope_scaling,
    refuse_sliding_window,
)

NAME = "Qwen2 / Qwen2.5"
MODEL_TYPE = "qwen2"
ARCHITECTURES = ("Qwen2ForCausalLM",)


def arch_from_hf_config(config: dict[str, Any], source: str = "config.json") -> DecoderArch:
    check_architectures(config, source, MODEL_TYPE, ARCHITECTURES, NAME)
    refuse_sliding_window(config, source)
    refuse_rope_scaling(config, source, NAME)
    return read_decoder_config(config, source, qkv_bias=True)


FAMILY = decoder_family(
    name=NAME,
    model_type=MODEL_TYPE,
    hf_model_class=ARCHITECTURES[0],
    hf_config_class="Qwen2Config",
    chat_templates=("AM-thinking", "qwen", "qwen3"),  # ChatML (<|im_start|>, <|im_end|>)
    arch_from_hf_config=arch_from_hf_config,
)
