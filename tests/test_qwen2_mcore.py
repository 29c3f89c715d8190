"""The Qwen2 model definition on megatron-core and the HF <-> megatron-core mapping: logits against
transformers in fp32, a bitwise round trip, the QKV layout on a hand-built example, refused configs."""

from __future__ import annotations

import json

import pytest
import torch

from common.distributed import run_distributed
from common.errors import CheckpointError, UnsupportedModelError
from formats.hf_safetensors import HFSafetensorsReader
from models.decoder.arch import DecoderArch
from models.decoder.state_dict_adapter import bound_mappings
from models.qwen2 import arch_from_hf_config as qwen2_arch
from models.registry import read_arch
from testing.mappings import to_hf, to_mcore

from mcore_ranks import megatron_logits_from_hf

TOKENS = [
    [151644, 872, 198, 6023, 11, 1879, 0, 17, 151645, 198, 151644, 77091],
    [9707, 1879, 220, 16, 17, 18, 19, 20, 21, 13, 198, 42],
]


@pytest.mark.slow
def test_logits_match_transformers(tiny_qwen2_dir):
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(
        tiny_qwen2_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        expected = hf(torch.tensor(TOKENS)).logits
    (ours,) = run_distributed(megatron_logits_from_hf, 1, str(tiny_qwen2_dir), TOKENS)
    assert ours.shape == expected.shape
    diff = (ours - expected).abs()
    assert diff.max().item() <= 1e-4, f"max abs logit diff {diff.max().item():.3g}"


def test_round_trip_is_bitwise_and_consumes_every_tensor_once(tiny_qwen2_dir):
    arch = read_arch(tiny_qwen2_dir)
    reader = HFSafetensorsReader(tiny_qwen2_dir)
    mappings = bound_mappings(arch)
    mcore = {m.key: to_mcore(m, [reader.read(key) for key in m.hf_keys]) for m in mappings}
    assert not reader.not_read_exactly_once()
    assert len(mcore) == len(mappings)
    back = {
        key: tensor for m in mappings for key, tensor in zip(m.hf_keys, to_hf(m, mcore[m.key]), strict=True)
    }
    assert back.keys() == reader.keys()
    fresh = HFSafetensorsReader(tiny_qwen2_dir)
    for key, tensor in back.items():
        original = fresh.read(key)
        assert tensor.dtype == original.dtype and torch.equal(tensor, original), key
    # The torch_dist naming of norms (TE names) binds the same HF tensors.
    te = {m.key: m.hf_keys for m in bound_mappings(arch, "te")}
    local = {m.key: m.hf_keys for m in mappings}
    assert (
        te["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"]
        == local["decoder.layers.0.input_layernorm.weight"]
        == ("model.layers.0.input_layernorm.weight",)
    )


def test_qkv_layout_by_hand():
    # 4 query heads in 2 KV groups, head_dim 1, hidden 1: rows are labelled by their origin.
    arch = DecoderArch(
        model_type="qwen2",
        vocab_size=8,
        hidden_size=1,
        ffn_hidden_size=2,
        num_layers=1,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=1,
        rms_norm_eps=1e-6,
        rope_base=1e6,
        tie_word_embeddings=True,
        max_position_embeddings=16,
        qkv_bias=True,
    )
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # heads 0, 1 (group 0), 2, 3 (group 1)
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    qkv = next(m for m in bound_mappings(arch) if m.key.endswith("linear_qkv.weight"))
    fused = to_mcore(qkv, [q, k, v])
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    assert [t.flatten().tolist() for t in to_hf(qkv, fused)] == [[10, 11, 12, 13], [20, 21], [30, 31]]
    # Streaming pieces: megatron rows 1..5 come from q row 1, k row 0, v row 0, q row 2.
    assert list(qkv.blocks_for_mcore_rows(1, 5)) == [(0, 1, 0, 1), (1, 0, 1, 1), (2, 0, 2, 1), (0, 2, 3, 1)]
    assert list(qkv.blocks_for_hf_rows(0, 1, 3)) == [(1, 0, 1), (4, 1, 1)]
    gated = next(m for m in bound_mappings(arch) if m.key.endswith("linear_fc1.weight"))
    fc1 = to_mcore(gated, [torch.ones(2, 1), 2 * torch.ones(2, 1)])
    assert fc1[:2].eq(1).all() and fc1[2:].eq(2).all()


def _config(tiny_qwen2_dir) -> dict:
    return json.loads((tiny_qwen2_dir / "config.json").read_text())


def test_an_explicit_head_dim_may_differ_from_hidden_over_heads(tiny_qwen2_dir):
    # One tensor-parallel-8 rank of Qwen2.5-32B: 5 heads of 128 on a 5120-wide residual stream.
    config = {
        **_config(tiny_qwen2_dir),
        "hidden_size": 5120,
        "num_attention_heads": 5,
        "num_key_value_heads": 1,
        "head_dim": 128,
    }
    arch = qwen2_arch(config)
    assert (arch.num_attention_heads * arch.head_dim, arch.hidden_size) == (640, 5120)
    qkv = next(m for m in bound_mappings(arch) if m.key.endswith("linear_qkv.weight"))
    assert qkv.mcore_shape == (640 + 2 * 128, 5120)
    with pytest.raises(UnsupportedModelError, match="inconsistent"):  # without head_dim, 5120 / 3 is no width
        qwen2_arch({**config, "num_attention_heads": 3, "head_dim": None})


def test_arch_reads_everything_from_the_config(tiny_qwen2_dir):
    config = _config(tiny_qwen2_dir)
    arch = qwen2_arch(config)
    assert arch.rope_base == 1_000_000.0 and arch.rms_norm_eps == config["rms_norm_eps"]
    assert (arch.num_attention_heads, arch.num_query_groups, arch.head_dim) == (4, 2, 16)
    assert arch.tie_word_embeddings == config["tie_word_embeddings"]
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    assert qwen2_arch(config).rope_base == 5e5  # transformers 5 layout


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "only Qwen2"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"hidden_act": "gelu"}, "SwiGLU"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
        ({"rope_theta": None, "rope_parameters": None}, "no rope_theta"),
        ({"num_key_value_heads": 3}, "inconsistent"),
    ],
)
def test_unsupported_configs_are_refused(tiny_qwen2_dir, change, message):
    config = {**_config(tiny_qwen2_dir), **change}
    with pytest.raises(UnsupportedModelError, match=message):
        qwen2_arch(config)


def test_a_config_missing_a_field_is_named_not_a_key_error(tiny_qwen2_dir):
    config = _config(tiny_qwen2_dir)
    del config["num_hidden_layers"], config["rms_norm_eps"]
    with pytest.raises(UnsupportedModelError, match="no num_hidden_layers, rms_norm_eps; a model's config"):
        qwen2_arch(config)


def test_shape_mismatch_and_missing_shard_are_named(tiny_qwen2_dir, tmp_path):
    config = _config(tiny_qwen2_dir)
    arch = qwen2_arch({**config, "intermediate_size": config["intermediate_size"] + 1})
    reader = HFSafetensorsReader(tiny_qwen2_dir)
    gated = next(m for m in bound_mappings(arch) if m.key.endswith("linear_fc1.weight"))
    with pytest.raises(CheckpointError, match="gate_proj.weight: shape"):
        to_mcore(gated, [reader.read(key) for key in gated.hf_keys])
    for file in tiny_qwen2_dir.iterdir():
        if not file.name.startswith("model-00002"):
            (tmp_path / file.name).symlink_to(file)
    with pytest.raises(CheckpointError, match="model-00002-of"):
        HFSafetensorsReader(tmp_path)
