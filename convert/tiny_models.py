"""Small random Qwen2 models saved as Hugging Face checkpoints, for tests and the demo.

They keep every structural trait of Qwen2.5 that a converter or trainer can get wrong (GQA, qkv bias,
rope base 1e6, RMSNorm eps, SwiGLU, tied or untied embeddings, the padded vocabulary) at widths that
run in seconds on a CPU, and are saved as several safetensors shards with an index, like the real ones.

    python -m convert.tiny_models OUT_DIR [--tied] [--layers N]
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Qwen2.5 pads the 151,665-token vocabulary to 151,936 (0.5B..14B) or 152,064 (32B, 72B).
QWEN25_VOCAB_SIZE_SMALL = 151936


def tiny_qwen2_config(
    *,
    tie_word_embeddings: bool = False,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 176,
    vocab_size: int = QWEN25_VOCAB_SIZE_SMALL,
    rope_theta: float = 1_000_000.0,
    rms_norm_eps: float = 1e-6,
    max_position_embeddings: int = 32768,
):
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        tie_word_embeddings=tie_word_embeddings,
        use_sliding_window=False,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151643,
        torch_dtype="float32",
    )


def make_tiny_qwen2(out_dir: str | Path, *, seed: int = 0, max_shard_size: str = "20MB", **config_kwargs) -> Path:
    """Writes a random `Qwen2ForCausalLM` (config from `tiny_qwen2_config(**config_kwargs)`) to `out_dir`."""
    import torch
    from transformers import Qwen2ForCausalLM

    config = tiny_qwen2_config(**config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # random non-zero biases and norm weights, so a mapping that drops them shows
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="directory to write the model to")
    parser.add_argument("--tied", action="store_true", help="tie input and output embeddings (as Qwen2.5 0.5B-3B)")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights (default 0)")
    args = parser.parse_args()
    print(make_tiny_qwen2(args.out_dir, seed=args.seed, tie_word_embeddings=args.tied, num_layers=args.layers))
