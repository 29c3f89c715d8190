"""The architecture of a Qwen2-family checkpoint, read from its Hugging Face config.json.

Every architectural value (widths, heads, GQA groups, RMSNorm eps, rope base, qkv bias, tied
embeddings, vocabulary size) comes from the config; nothing is specific to the 32B model.
Configurations the model definition cannot represent exactly (sliding-window attention, rope scaling,
other activations, other architectures) are refused with a message saying why.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from common.errors import UnsupportedModelError
from models.hf_config import read_hf_config

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class Qwen2Arch:
    """The architecture facts of a Qwen2-family checkpoint, as read from its config.json."""

    MODEL_TYPE: ClassVar[str] = "qwen2"  # its family in models/registry.py

    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    rms_norm_eps: float
    rope_base: float
    tie_word_embeddings: bool
    max_position_embeddings: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> Qwen2Arch:
        architectures = config.get("architectures") or []
        if config.get("model_type") != cls.MODEL_TYPE or (
            architectures and architectures[0] not in SUPPORTED_ARCHITECTURES
        ):
            raise UnsupportedModelError(
                f"{source}: model_type={config.get('model_type')!r}, architectures={architectures}; "
                f"only Qwen2/Qwen2.5 causal LMs ({', '.join(SUPPORTED_ARCHITECTURES)}) are supported"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(
                f"{source}: hidden_act={config['hidden_act']!r}; Qwen2 uses SwiGLU (silu)"
            )
        if config.get("use_sliding_window"):
            raise UnsupportedModelError(
                f"{source}: sliding-window attention is not supported (use_sliding_window=true)"
            )
        rope_parameters = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type")) or rope_parameters.get(
            "rope_type", "default"
        )
        if rope_type != "default":
            raise UnsupportedModelError(f"{source}: rope scaling {rope_type!r} is not supported")
        rope_base = config.get("rope_theta", rope_parameters.get("rope_theta"))
        if rope_base is None:  # transformers 5 keeps it in rope_parameters; never fall back to 10000 silently
            raise UnsupportedModelError(f"{source}: no rope_theta (nor rope_parameters.rope_theta)")
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        groups = config.get("num_key_value_heads", heads)
        # An explicit head_dim may differ from hidden / heads (transformers' Qwen2 honours it, and so does
        # megatron-core's kv_channels): one tensor-parallel rank's shapes form such a model.
        head_dim = config.get("head_dim") or hidden // heads
        if (not config.get("head_dim") and head_dim * heads != hidden) or heads % groups:
            raise UnsupportedModelError(
                f"{source}: hidden {hidden}, heads {heads}, kv heads {groups}, head_dim {head_dim} are "
                "inconsistent"
            )
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            ffn_hidden_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_query_groups=groups,
            head_dim=head_dim,
            rms_norm_eps=config["rms_norm_eps"],
            rope_base=float(rope_base),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=config.get("max_position_embeddings", 32768),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> Qwen2Arch:
        """From a config.json file, a Hugging Face model directory (config.json), or a converted or
        training checkpoint (hf_config.json)."""
        config, config_file = read_hf_config(path)
        return cls.from_hf_config(config, str(config_file))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
