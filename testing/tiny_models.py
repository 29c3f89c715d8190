"""Random models of each family saved as Hugging Face checkpoints, for tests, benchmarks and the demo.

- `make_tiny_model(out, family)`: small models built from transformers' own config class of the family,
  keeping every structural trait a converter or trainer can get wrong (GQA, qkv bias for Qwen2, q/k
  norms and head_dim != hidden / heads for Qwen3, Llama 3.1's rope scaling, RMSNorm eps, SwiGLU, tied
  or untied embeddings, the padded vocabulary) at widths that run in seconds on a CPU, saved as several
  safetensors shards with an index, like the real ones;
- `write_qwen25_32b_shaped`: Qwen2.5-32B's exact widths with fewer layers, random bf16 weights
  written piece by piece (for the conversion and GPU benchmarks); `write_shaped` the same for any
  published config (Qwen3-30B-A3B's experts for the conversion benchmark).

    python -m testing.tiny_models OUT_DIR [--family qwen3] [--tied] [--layers N] [--tokenizer DIR]

(the command line also writes a tokenizer into OUT_DIR, as a real snapshot has one)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# Qwen2.5 pads the 151,665-token vocabulary to 151,936 (0.5B..14B) or 152,064 (32B, 72B). The tiny models
# of every family use it, so that the offline Qwen2.5 tokenizer of the tests serves them all.
QWEN25_VOCAB_SIZE_SMALL = 151936
QWEN_BOS_EOS = dict(bos_token_id=151643, eos_token_id=151643)

# What each family's tiny model sets beyond the shared widths (transformers' config class arguments).
_FAMILY_SETTINGS = {
    "qwen2": dict(rope_theta=1_000_000.0, use_sliding_window=False, **QWEN_BOS_EOS),
    # head_dim 32 with 4 heads on a 64-wide stream: the width of the attention differs from the model's
    "qwen3": dict(
        rope_theta=1_000_000.0, head_dim=32, attention_bias=False, use_sliding_window=False, **QWEN_BOS_EOS
    ),
    # Qwen3's attention with 8 experts of width 32, 2 per token, their probabilities renormalised (as
    # Qwen3-30B-A3B's config says); intermediate_size is the dense width no layer uses here
    "qwen3_moe": dict(
        rope_theta=1_000_000.0,
        head_dim=32,
        attention_bias=False,
        use_sliding_window=False,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        **QWEN_BOS_EOS,
    ),
    # Llama 3.1's rope scaling and context; bos/eos are Qwen ids here (the tests' tokenizer is Qwen2.5's)
    "llama": dict(
        rope_theta=500_000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        attention_bias=False,
        mlp_bias=False,
        **QWEN_BOS_EOS,
    ),
}
_MAX_POSITIONS = {"qwen2": 32768, "qwen3": 40960, "qwen3_moe": 40960, "llama": 131072}
TINY_FAMILIES = tuple(_FAMILY_SETTINGS)  # the model types make_tiny_model builds
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what testing/tokenizer.py writes


def tiny_config(
    family: str = "qwen2",
    *,
    tie_word_embeddings: bool = False,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 176,
    vocab_size: int = QWEN25_VOCAB_SIZE_SMALL,
    rms_norm_eps: float = 1e-6,
    max_position_embeddings: int | None = None,
    **family_overrides,
):
    """transformers' config object (its own class for `family`, a model_type) of a tiny model."""
    import transformers

    from models.registry import family_for_config

    config_class = getattr(transformers, family_for_config({"model_type": family}).hf_config_class)
    settings = {**_FAMILY_SETTINGS[family], **family_overrides}
    return config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings or _MAX_POSITIONS[family],
        rms_norm_eps=rms_norm_eps,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=0.0,
        torch_dtype="float32",
        **settings,
    )


def make_tiny_model(
    out_dir: str | Path,
    family: str = "qwen2",
    *,
    seed: int = 0,
    max_shard_size: str = "20MB",
    plain_init: bool = False,
    **config_kwargs,
) -> Path:
    """Writes a random model of `family` (transformers' class; config from `tiny_config(family,
    **config_kwargs)`) to `out_dir`.

    By default biases and norm weights (q/k norms too) are random as well (N(0, 0.1), N(1, 0.1)), so that
    a converter or a mapping that drops or swaps them shows in a comparison. `plain_init` keeps
    transformers' own initialisation (zero biases, unit norms), the better start for a model meant to
    learn."""
    import torch
    import transformers

    from models.registry import family_for_config

    config = tiny_config(family, **config_kwargs)
    model_class = getattr(transformers, family_for_config({"model_type": family}).hf_model_class)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not plain_init and (name.endswith(".bias") or "norm" in name):
                param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
            if not plain_init and name.endswith("mlp.gate.weight"):
                # a decisive router: logits of a few units, so that no token's top-k choice is a near
                # tie that rounding in another implementation could flip
                param.normal_(std=0.5)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    return out_dir


QWEN25_32B_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 5120,
    "intermediate_size": 27648,
    "num_attention_heads": 40,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}


# The published config.json values of the other families' models the shipped configs train (Qwen3-32B
# base, Llama 3.1 8B) and of Qwen3's mixtures of experts, for the planner, the dry run and their tests.
QWEN3_32B_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 5120,
    "intermediate_size": 25600,
    "num_hidden_layers": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
    "hidden_act": "silu",
    "attention_bias": False,
    "use_sliding_window": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "torch_dtype": "bfloat16",
}
# Qwen3's published mixtures of experts: Qwen3's attention and vocabulary (the dense intermediate_size
# is unused: every layer has experts)
QWEN3_30B_A3B_CONFIG = {
    **QWEN3_32B_CONFIG,
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "router_aux_loss_coef": 0.001,
}
QWEN3_235B_A22B_CONFIG = {
    **QWEN3_30B_A3B_CONFIG,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 94,
    "num_attention_heads": 64,
}
LLAMA31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}


def write_qwen25_32b_shaped(out: str | Path, layers: int, std: float = 1.0) -> Path:
    """Qwen2.5-32B-shaped random bf16 weights (normal, `std`; norm weights 1 when std < 1, so that a model
    trained from them stays finite) with `layers` layers, in 5 GB shards, written piece by piece."""
    return write_shaped(out, QWEN25_32B_CONFIG, layers, std)


def write_shaped(out: str | Path, published: dict, layers: int, std: float = 1.0) -> Path:
    """Random bf16 weights of the model of a published config.json (`published`) with `layers` layers,
    as `write_qwen25_32b_shaped` writes Qwen2.5-32B's."""
    import json

    import torch

    from formats.hf_safetensors import TensorSpec, write_sharded
    from models.registry import arch_from_config, family_of

    out = Path(out)
    out.mkdir(parents=True)
    config = {**published, "num_hidden_layers": layers}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    arch = arch_from_config(config)
    specs = [
        TensorSpec(k, s, torch.bfloat16)
        for m in family_of(arch).bound_mappings(arch)
        for k, s in zip(m.hf_keys, m.hf_shapes, strict=True)
    ]
    generator = torch.Generator().manual_seed(0)

    def random_rows(spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
        if std < 1 and "norm" in spec.key:
            return torch.ones((stop - start, *spec.shape[1:]), dtype=torch.bfloat16)
        return (std * torch.randn((stop - start, *spec.shape[1:]), generator=generator)).to(torch.bfloat16)

    write_sharded(out, specs, random_rows, max_shard_bytes=5 * 10**9, piece_bytes=lambda spec: 256 << 20)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m testing.tiny_models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out_dir", help="directory to write the model to (config, weights and tokenizer)")
    parser.add_argument(
        "--family", default="qwen2", choices=TINY_FAMILIES, help="the model family (default qwen2)"
    )
    parser.add_argument(
        "--tied",
        action="store_true",
        help="tie input and output embeddings (as Qwen2.5 0.5B-3B, Qwen3 0.6B-4B, Llama 3.2)",
    )
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    parser.add_argument(
        "--plain-init",
        action="store_true",
        help="transformers' own initialisation (zero biases, unit norms) instead of random biases and norm "
        "weights (which make conversion tests sensitive to them but slow learning down)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="copy this tokenizer directory's tokenizer.json and tokenizer_config.json into the model, as a "
        "real snapshot ships them (default: build the offline Qwen2.5 tokenizer there, testing/tokenizer.py)",
    )
    args = parser.parse_args(argv)
    model_dir = make_tiny_model(
        args.out_dir,
        args.family,
        seed=args.seed,
        tie_word_embeddings=args.tied,
        num_layers=args.layers,
        plain_init=args.plain_init,
    )
    if args.tokenizer is None:
        from testing.tokenizer import build_qwen25_tokenizer

        build_qwen25_tokenizer(model_dir)
    else:
        for name in TOKENIZER_FILES:
            shutil.copy(args.tokenizer / name, model_dir / name)
    print(model_dir)
    return model_dir


if __name__ == "__main__":
    main()
