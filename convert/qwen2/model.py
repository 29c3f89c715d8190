"""The Qwen2-family model definition on megatron-core, built from a Hugging Face config.json.

Used by the converters, the verification tool and the trainer, so there is exactly one place that
decides how a Qwen2.5 checkpoint maps onto megatron-core's `TransformerConfig` and `GPTModel`. Every
architectural value (widths, heads, GQA groups, RMSNorm eps, rope base, qkv bias, tied embeddings,
vocabulary size) is read from the config; nothing is specific to the 32B model. Configurations this
definition cannot represent exactly (sliding-window attention, rope scaling, other activations,
other architectures) are refused with a message saying why.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM",)


class UnsupportedModelError(ValueError):
    """The HF config describes something this model definition cannot represent exactly."""


@dataclass(frozen=True)
class Qwen2Arch:
    """The architecture facts of a Qwen2-family checkpoint, as read from its config.json."""

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
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "Qwen2Arch":
        architectures = config.get("architectures") or []
        if config.get("model_type") != "qwen2" or (architectures and architectures[0] not in SUPPORTED_ARCHITECTURES):
            raise UnsupportedModelError(
                f"{source}: model_type={config.get('model_type')!r}, architectures={architectures}; "
                f"only Qwen2/Qwen2.5 causal LMs ({', '.join(SUPPORTED_ARCHITECTURES)}) are supported"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={config['hidden_act']!r}; Qwen2 uses SwiGLU (silu)")
        if config.get("use_sliding_window"):
            raise UnsupportedModelError(f"{source}: sliding-window attention is not supported (use_sliding_window=true)")
        rope_parameters = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        rope_type = scaling.get("rope_type", scaling.get("type")) or rope_parameters.get("rope_type", "default")
        if rope_type != "default":
            raise UnsupportedModelError(f"{source}: rope scaling {rope_type!r} is not supported")
        rope_base = config.get("rope_theta", rope_parameters.get("rope_theta"))
        if rope_base is None:  # transformers 5 keeps it in rope_parameters; never fall back to 10000 silently
            raise UnsupportedModelError(f"{source}: no rope_theta (nor rope_parameters.rope_theta)")
        heads, hidden = config["num_attention_heads"], config["hidden_size"]
        groups = config.get("num_key_value_heads", heads)
        head_dim = config.get("head_dim") or hidden // heads
        if head_dim * heads != hidden or heads % groups:
            raise UnsupportedModelError(f"{source}: hidden {hidden}, heads {heads}, kv heads {groups}, head_dim {head_dim} are inconsistent")
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
    def from_hf_dir(cls, path: str | Path) -> "Qwen2Arch":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: pass a Hugging Face model directory")
        return cls.from_hf_config(json.loads(config_file.read_text()), str(config_file))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transformer_config(
    arch: Qwen2Arch,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    params_dtype: torch.dtype = torch.float32,
    use_cpu_initialization: bool = False,
    **overrides: Any,
):
    """megatron-core's TransformerConfig for `arch`. Fusions that need apex or TE are off by default;
    the trainer turns on what its environment supports through `overrides`."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    settings: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    settings.update(overrides)
    return TransformerConfig(**settings)


def te_available(device: str) -> bool:
    """Whether Transformer Engine can run here: on CUDA, when it imports."""
    if device != "cuda":
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def use_te(device: str) -> bool:
    """Whether to use Transformer Engine's layer spec (see te_available); says which and why."""
    if te_available(device):
        log.info("layer spec: Transformer Engine")
        return True
    why = f"running on {device}" if device != "cuda" else "Transformer Engine is not importable"
    log.info("layer spec: megatron-core local (pure torch): %s", why)
    return False


def layer_spec(use_transformer_engine: bool):
    """TE's fused layers when TE is importable and wanted, megatron-core's local (pure torch) ones otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")


def build_model(arch: Qwen2Arch, config, spec, *, pre_process: bool = True, post_process: bool = True, vp_stage=None):
    """A GPTModel (this rank's pipeline stage) for `arch` with megatron-core's RoPE at the config's base."""
    from megatron.core.models.gpt import GPTModel

    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=arch.rope_base,  # Megatron-LM's own Qwen2.5 loader forgets this (DESIGN.md, section 4)
        vp_stage=vp_stage,
    )


def load_checkpoint_weights(models, checkpoint_dir) -> None:
    """Loads this rank's part of the model weights from a torch_dist checkpoint, whatever layout it was
    saved at (megatron-core reads the overlapping stored chunks). `models` is a model or this rank's list
    of virtual-pipeline chunks, loaded in one collective call (megatron-core checks that the ranks
    together read every stored layer). Transformer Engine's `_extra_state` (FP8 scaling state) is not part
    of a weight checkpoint and is left as initialised."""
    from megatron.core import dist_checkpointing

    models = models if isinstance(models, (list, tuple)) else [models]
    sharded = {f"chunk{i}": {k: v for k, v in model.sharded_state_dict().items() if not k.endswith("_extra_state")}
               for i, model in enumerate(models)}
    state = dist_checkpointing.load(sharded, str(checkpoint_dir))
    for i, model in enumerate(models):
        missing, unexpected = model.load_state_dict(state[f"chunk{i}"], strict=False)
        problems = [k for k in missing if not k.endswith("_extra_state")] + list(unexpected)
        if problems:
            raise RuntimeError(f"{checkpoint_dir}: weights do not match the model: {problems[:5]}")
