"""The architecture of a dense decoder checkpoint (Qwen2/2.5, Qwen3, Llama 3.x), read from its config.json.

Every family here is the same decoder: grouped-query attention with RoPE, RMSNorm, a SwiGLU MLP. They
differ in a few traits, each a field of `DecoderArch`: a bias on the QKV projection (Qwen2), an RMSNorm
on each query and key head (Qwen3), Llama 3.1-style rope scaling (Llama), a mixture of SwiGLU experts
in place of the MLP (Qwen3 MoE). A family's reader
(`models/<family>/__init__.py`) checks what its config may say and calls `read_decoder_config` for the
rest, so every architectural value comes from the config and anything the model definition cannot
represent exactly (sliding windows, other activations, other rope types) is refused with the field and
the reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from common.errors import UnsupportedModelError


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent rope scaling (`rope_type: llama3`): wavelengths beyond
    original_max_position_embeddings / low_freq_factor are divided by `factor`, those below
    original / high_freq_factor kept, those between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class MixtureOfExperts:
    """Every layer's MLP as `num_experts` SwiGLU experts of width `expert_ffn_hidden_size`, each token
    routed to `experts_per_token` of them by a linear router's softmax, the chosen experts' outputs
    weighted by their probabilities (renormalised over the chosen ones with `normalize_top_k`). No
    shared expert, no capacity limit: every routed token is computed (dropless)."""

    num_experts: int
    experts_per_token: int
    expert_ffn_hidden_size: int
    normalize_top_k: bool


@dataclass(frozen=True)
class DecoderArch:
    """The architecture facts of a checkpoint, as read from its config.json."""

    model_type: str  # its family in models/registry.py
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
    qkv_bias: bool = False
    qk_layernorm: bool = False
    rope_scaling: Llama3RopeScaling | None = None
    moe: MixtureOfExperts | None = None

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of a config in either layout: transformers 4's `rope_theta` + `rope_scaling`,
    or transformers 5's `rope_parameters` (which holds the theta too)."""
    return {**(config.get("rope_parameters") or {}), **(config.get("rope_scaling") or {})}


def rope_type(config: dict[str, Any]) -> str:
    parameters = rope_parameters(config)
    return parameters.get("rope_type", parameters.get("type")) or "default"


def refuse_rope_scaling(config: dict[str, Any], source: str, family: str) -> None:
    if rope_type(config) != "default":
        raise UnsupportedModelError(
            f"{source}: rope scaling {rope_type(config)!r} is not supported for {family} (only the "
            "default rope)"
        )


def refuse_true(config: dict[str, Any], source: str, fields: tuple[str, ...], family: str) -> None:
    """Refuses any of `fields` set true: options the family's model definition here does not have."""
    for field in fields:
        if config.get(field):
            raise UnsupportedModelError(
                f"{source}: {field}={config[field]!r}; {family} is supported without it (the "
                "megatron-core model here has no such option)"
            )


def refuse_sliding_window(config: dict[str, Any], source: str) -> None:
    if config.get("use_sliding_window"):
        raise UnsupportedModelError(
            f"{source}: sliding-window attention is not supported (use_sliding_window=true)"
        )
    layer_types = set(config.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise UnsupportedModelError(
            f"{source}: layer_types {sorted(layer_types)}; only full attention in every layer is supported"
        )


# The fields every family's config.json must give (the others have defaults).
REQUIRED_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "rms_norm_eps",
)


def read_decoder_config(
    config: dict[str, Any],
    source: str,
    *,
    qkv_bias: bool = False,
    qk_layernorm: bool = False,
    rope_scaling: Llama3RopeScaling | None = None,
    moe: MixtureOfExperts | None = None,
) -> DecoderArch:
    """The architecture of `config` with the family's traits; checks what every family shares (SwiGLU,
    an explicit rope base, consistent head counts)."""
    missing = [name for name in REQUIRED_FIELDS if name not in config]
    if missing:
        raise UnsupportedModelError(
            f"{source}: no {', '.join(missing)}; a model's config.json (as transformers writes it) names "
            f"{', '.join(REQUIRED_FIELDS)}"
        )
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"{source}: hidden_act={config['hidden_act']!r}; the supported models use SwiGLU (silu)"
        )
    rope_base = config.get("rope_theta", rope_parameters(config).get("rope_theta"))
    if rope_base is None:  # transformers 5 keeps it in rope_parameters; never fall back to 10000 silently
        raise UnsupportedModelError(f"{source}: no rope_theta (nor rope_parameters.rope_theta)")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    groups = config.get("num_key_value_heads") or heads
    # An explicit head_dim may differ from hidden / heads (Qwen3 at several sizes; transformers honours it,
    # and so does megatron-core's kv_channels): one tensor-parallel rank's shapes form such a model too.
    head_dim = config.get("head_dim") or hidden // heads
    if (not config.get("head_dim") and head_dim * heads != hidden) or heads % groups:
        raise UnsupportedModelError(
            f"{source}: hidden {hidden}, heads {heads}, kv heads {groups}, head_dim {head_dim} are "
            "inconsistent"
        )
    return DecoderArch(
        model_type=config["model_type"],
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
        qkv_bias=qkv_bias,
        qk_layernorm=qk_layernorm,
        rope_scaling=rope_scaling,
        moe=moe,
    )


def check_architectures(
    config: dict[str, Any], source: str, model_type: str, architectures: tuple[str, ...], family: str
) -> None:
    """The config is `model_type` and, when it names them, one of the family's causal-LM classes."""
    named = config.get("architectures") or []
    if config.get("model_type") != model_type or (named and named[0] not in architectures):
        raise UnsupportedModelError(
            f"{source}: model_type={config.get('model_type')!r}, architectures={named}; "
            f"only {family} causal LMs ({', '.join(architectures)}) are read as model_type {model_type!r}"
        )
