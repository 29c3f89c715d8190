"""The TransformerConfig the trainer builds: Transformer Engine's fused kernels (and grouped experts)
when TE runs (checked through the configuration, since TE is not installed here), torch's paths
otherwise, and the recomputation choices."""

from __future__ import annotations

import dataclasses

import pytest

from models.backends import Backend
from models.decoder.arch import DecoderArch, MixtureOfExperts
from models.decoder.model import transformer_config
from models.megatron_settings import kernel_settings, recompute_settings

ARCH = DecoderArch(
    model_type="qwen2",
    vocab_size=256,
    hidden_size=64,
    ffn_hidden_size=96,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    head_dim=16,
    rms_norm_eps=1e-6,
    rope_base=1e6,
    tie_word_embeddings=False,
    max_position_embeddings=128,
    qkv_bias=True,
)
TE, TORCH = Backend(True, "test"), Backend(False, "test")
FUSIONS = (
    "apply_rope_fusion",
    "bias_activation_fusion",
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
)


@pytest.fixture
def te_rope(monkeypatch):
    """megatron-core checks at construction that TE's fused RoPE imports; a stand-in lets the TE path's
    configuration be built (and inspected) where TE is not installed."""
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)


def test_the_te_path_turns_on_what_megatron_lm_uses(te_rope):
    config = transformer_config(ARCH, use_cpu_initialization=True, **kernel_settings(TE))
    assert all(getattr(config, name) is True for name in FUSIONS)
    assert config.cross_entropy_fusion_impl == "te"


def test_the_te_path_runs_a_mixture_of_experts_as_one_grouped_gemm(te_rope):
    """TE's layer spec then builds TEGroupedMLP (its checkpoint keys are the local spec's: models/decoder/
    state_dict_adapter.py); megatron-core's config accepts the combination. Unmeasured: no TE here."""
    experts = dataclasses.replace(
        ARCH,
        model_type="qwen3_moe",
        moe=MixtureOfExperts(
            num_experts=4, experts_per_token=2, expert_ffn_hidden_size=32, normalize_top_k=True
        ),
    )
    assert kernel_settings(TE, experts)["moe_grouped_gemm"] is True
    assert "moe_grouped_gemm" not in kernel_settings(TE, ARCH)
    assert kernel_settings(TORCH, experts) == {}  # the local spec: one module per expert
    config = transformer_config(experts, use_cpu_initialization=True, **kernel_settings(TE, experts))
    assert (config.moe_grouped_gemm, config.num_moe_experts, config.moe_router_topk) == (True, 4, 2)


def test_the_torch_path_keeps_the_fallbacks():
    assert kernel_settings(TORCH) == {}
    config = transformer_config(ARCH, use_cpu_initialization=True, **kernel_settings(TORCH))
    assert not any(getattr(config, name) for name in FUSIONS)
    assert config.cross_entropy_fusion_impl == "native"


def test_recomputation_choices():
    assert recompute_settings("none") == {}
    mlp = transformer_config(ARCH, use_cpu_initialization=True, **recompute_settings("selective", ["mlp"]))
    assert (mlp.recompute_granularity, mlp.recompute_modules) == ("selective", ["mlp"])
    attention = transformer_config(ARCH, use_cpu_initialization=True, **recompute_settings("selective"))
    assert attention.recompute_modules == ["core_attn"]
    full = transformer_config(ARCH, use_cpu_initialization=True, **recompute_settings("full"))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == (
        "full",
        "uniform",
        1,
    )


def test_recompute_modules_are_validated(tmp_path):
    from common.errors import ConfigError
    from sft.config import load_config

    base = [f"checkpoint.save_dir={tmp_path}", f"model.random_init_config={tmp_path / 'c.json'}"]
    (tmp_path / "c.json").write_text("{}")
    for extra, message in (
        (["model.recompute_modules=[mlp, attn]"], "['attn'] unknown"),
        (["model.recompute=full", "model.recompute_modules=[mlp]"], "applies to model.recompute=selective"),
    ):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, base + extra).validate(world_size=1, te_available=False)
