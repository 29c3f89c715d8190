"""Llama 3 / 3.1 / 3.2 (`model_type` llama): the dense decoder without biases, with Llama 3.1's rope
scaling where the config has it (`rope_type: llama3`).

megatron-core applies that scaling with its frequency factors fixed at Llama 3.1's (low 1, high 4,
original context 8192, which every Llama 3.x release uses) and only the factor free, so a config with
other values is refused rather than trained with different positions; so are other rope types and
attention or MLP biases. `FAMILY` binds it for models/registry.py: outside its own tests, nothing else
imports this package.
"""

from __future__ import annotations

from typing import Any

from common.errors import UnsupportedModelError
from models.decoder import DecoderArch, decoder_family
from models.decoder.arch import (
    Llama3RopeScaling,
    check_architectures,
    read_decoder_config,
    refuse_true,
    rope_parameters,
    rope_type,
)

NAME = "Llama 3.x"
MODEL_TYPE = "llama"
ARCHITECTURES = ("LlamaForCausalLM",)
# megatron-core's RotaryEmbedding._apply_scaling fixes these; only the factor is a parameter.
MEGATRON_LLAMA3_FREQUENCIES = dict(
    low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def rope_scaling(config: dict[str, Any], source: str) -> Llama3RopeScaling | None:
    kind = rope_type(config)
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(
            f"{source}: rope scaling {kind!r} is not supported for {NAME} (the default rope or 'llama3')"
        )
    parameters = rope_parameters(config)
    fields = ("factor", *MEGATRON_LLAMA3_FREQUENCIES)
    missing = [field for field in fields if parameters.get(field) is None]
    if missing:
        raise UnsupportedModelError(f"{source}: llama3 rope scaling without {', '.join(missing)}")
    for field, fixed in MEGATRON_LLAMA3_FREQUENCIES.items():
        if parameters[field] != fixed:
            raise UnsupportedModelError(
                f"{source}: llama3 rope scaling with {field}={parameters[field]}; megatron-core fixes it at "
                f"{fixed:g} (Llama 3.1's value), so only configs with that value are supported"
            )
    return Llama3RopeScaling(
        factor=float(parameters["factor"]),
        low_freq_factor=float(parameters["low_freq_factor"]),
        high_freq_factor=float(parameters["high_freq_factor"]),
        original_max_position_embeddings=int(parameters["original_max_position_embeddings"]),
    )


def arch_from_hf_config(config: dict[str, Any], source: str = "config.json") -> DecoderArch:
    check_architectures(config, source, MODEL_TYPE, ARCHITECTURES, NAME)
    refuse_true(config, source, ("attention_bias", "mlp_bias"), NAME)
    return read_decoder_config(config, source, rope_scaling=rope_scaling(config, source))


FAMILY = decoder_family(
    name=NAME,
    model_type=MODEL_TYPE,
    hf_model_class=ARCHITECTURES[0],
    hf_config_class="LlamaConfig",
    chat_templates=("llama3",),  # header tokens and <|eot_id|>
    arch_from_hf_config=arch_from_hf_config,
)
