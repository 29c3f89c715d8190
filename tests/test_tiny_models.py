"""The tiny random Qwen2 fixtures: sharded safetensors that transformers loads, with Qwen2.5's traits."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open


def test_sharded_checkpoint_with_qwen25_traits(tiny_qwen2_dir):
    from transformers import Qwen2ForCausalLM

    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    tied = config["tie_word_embeddings"]
    index = json.loads((tiny_qwen2_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2
    names = set(index["weight_map"])
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.1.self_attn.v_proj.bias" in names
    assert ("lm_head.weight" in names) != tied
    rope = config.get("rope_theta") or config["rope_parameters"]["rope_theta"]
    assert rope == 1_000_000.0 and config["num_key_value_heads"] < config["num_attention_heads"]

    with safe_open(str(tiny_qwen2_dir / index["weight_map"]["model.norm.weight"]), "pt") as f:
        assert not torch.allclose(
            f.get_tensor("model.norm.weight"), torch.ones(64)
        )  # randomised, not default

    model = Qwen2ForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).eval()
    logits = model(torch.tensor([[151644, 872, 198, 6023, 151645]])).logits
    assert logits.shape == (1, 5, config["vocab_size"]) and torch.isfinite(logits).all()
    assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) == tied
