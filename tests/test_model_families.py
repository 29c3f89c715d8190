"""Qwen3 and Llama 3.x against transformers' own classes, on one layout set each (Qwen2, the recipe's
family, is proven at every layout by the conversion and trainer tests): the architecture each config
reads to and what it refuses, logits at TP1 / TP2 / PP2, a bitwise round trip through the converters to
a release transformers loads with the family's class, a strict load by stock megatron-core, parameter
counts, Llama 3.1's rope frequencies past the original context, and training (the first loss per
conversation, and 3 steps at TP2 x PP2 equal to one process).

The tiny models (testing/tiny_models.py) keep each family's traits: Qwen3 with tied embeddings and
head_dim 32 on a 64-wide stream with 4 heads; Llama untied with Llama 3.1's rope scaling.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from common.distributed import run_distributed
from common.errors import UnsupportedModelError
from convert.verify import hf_logits, sample_token_ids, verify_conversion
from formats.hf_safetensors import HFSafetensorsReader
from models.registry import arch_from_config, family_of, read_arch
from plan.layout import ParallelLayout
from plan.planner import local_parameters
from testing.hf_reference import hf_model
from testing.mappings import to_hf, to_mcore
from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL, make_tiny_model

from mcore_ranks import megatron_logits_from_hf, stock_load_matches_ours
from tools_runner import run_tool
from trainer_ranks import train_tiny_model_at_layouts, transformers_first_loss

FAMILIES = {
    "qwen3": dict(family="qwen3", tie_word_embeddings=True),
    "llama": dict(family="llama"),
}
TOKENS = sample_token_ids(QWEN25_VOCAB_SIZE_SMALL, 2, 24, seed=3)


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request, tmp_path_factory):
    """A tiny random model of the family and its conversion by the tool."""
    root = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(root / "hf", **FAMILIES[request.param])
    mcore = root / "mcore"
    assert run_tool("convert_hf_to_mcore", ["--hf", str(hf), "--out", str(mcore), "--chunk-mb", "1"]) == 0
    return SimpleNamespace(name=request.param, hf=hf, mcore=mcore, root=root)


def _hf_config(model) -> dict:
    return json.loads((model.hf / "config.json").read_text())


def test_each_family_reads_its_traits(model):
    arch = read_arch(model.hf)
    assert arch.model_type == model.name
    assert not arch.qkv_bias
    if model.name == "qwen3":
        assert arch.qk_layernorm and arch.tie_word_embeddings
        assert arch.head_dim == 32 and arch.head_dim * arch.num_attention_heads != arch.hidden_size
    else:
        assert not arch.qk_layernorm and arch.rope_base == 500_000.0
        scaling = arch.rope_scaling
        assert (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor) == (8.0, 1.0, 4.0)
        assert scaling.original_max_position_embeddings == 8192


REFUSED = {
    "qwen3": [
        ({"attention_bias": True}, "attention_bias=True"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
        ({"architectures": ["Qwen3MoeForCausalLM"]}, "only Qwen3 causal LMs"),
    ],
    "llama": [
        ({"attention_bias": True}, "attention_bias=True"),
        ({"mlp_bias": True}, "mlp_bias=True"),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "without"),
        ({"hidden_act": "gelu"}, "SwiGLU"),
    ],
}


def test_each_family_refuses_what_it_cannot_represent(model):
    config = _hf_config(model)
    for change, message in REFUSED[model.name]:
        changed = {**config, **change}
        if "rope_parameters" in change:
            changed.pop("rope_scaling", None)
        with pytest.raises(UnsupportedModelError, match=message):
            arch_from_config(changed, "config.json")
    if model.name == "llama":  # megatron-core fixes the frequency factors: another value would train wrong
        other = {**config["rope_parameters"], "high_freq_factor": 2.0}
        with pytest.raises(UnsupportedModelError, match="high_freq_factor=2.0; megatron-core fixes it at 4"):
            arch_from_config({**config, "rope_parameters": other}, "config.json")


def test_parameter_count_equals_transformers(model):
    for tied in (False, True):
        hf = make_tiny_model(model.root / f"count-{tied}", model.name, tie_word_embeddings=tied)
        assert local_parameters(read_arch(hf), ParallelLayout()) == hf_model(hf).num_parameters()


def test_round_trip_in_memory_is_bitwise(model):
    arch = read_arch(model.hf)
    reader = HFSafetensorsReader(model.hf)
    mappings = family_of(arch).bound_mappings(arch)
    mcore = {m.key: to_mcore(m, [reader.read(key) for key in m.hf_keys]) for m in mappings}
    assert not reader.not_read_exactly_once()  # every HF tensor (q/k norms included) mapped exactly once
    fresh = HFSafetensorsReader(model.hf)
    for m in mappings:
        for key, tensor in zip(m.hf_keys, to_hf(m, mcore[m.key]), strict=True):
            assert torch.equal(tensor, fresh.read(key)), key
    if model.name == "qwen3":
        assert mcore["decoder.layers.1.self_attention.q_layernorm.weight"].shape == (arch.head_dim,)


def test_the_converted_checkpoint_holds_each_spec_s_extra_state(model):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    stored = FileSystemReader(str(model.mcore)).read_metadata().state_dict_metadata
    objects = {key for key, meta in stored.items() if isinstance(meta, BytesStorageMetadata)}
    layers = read_arch(model.hf).num_layers
    # five modules a layer (the four linear layers, TE's attention), Qwen3's two query/key norms under
    # the TE spec (TE's RMSNorm keeps extra state), and the final norm once
    per_layer = 7 if model.name == "qwen3" else 5
    assert len(objects) == per_layer * layers + 1
    norm = f"decoder.layers.self_attention.k_layernorm._extra_state/shard_{layers - 1}_{layers}"
    assert (norm in objects) == (model.name == "qwen3")


@pytest.mark.slow
def test_logits_match_transformers_at_tp1(model):
    with torch.no_grad():
        expected = hf_model(model.hf)(torch.tensor(TOKENS)).logits
    (ours,) = run_distributed(megatron_logits_from_hf, 1, str(model.hf), TOKENS)
    assert (ours - expected).abs().max().item() <= 1e-4


@pytest.mark.slow
def test_llama3_rope_frequencies_equal_transformers_past_the_original_context(tmp_path):
    """The GPTModel's rotary frequencies are transformers' (scaled, not the plain ones), and so are the
    angles at positions up to twice the original 8,192-token context. (A whole-model comparison that
    long does not fit a CPU test: megatron-core's local attention materialises every score.)"""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    llama = make_tiny_model(tmp_path, **FAMILIES["llama"])
    (ours,) = run_distributed(_rotary_angles, 1, str(llama), 16384)
    reference = LlamaRotaryEmbedding(hf_model(llama).config)
    positions = torch.arange(16384)[None]
    cos, sin = reference(torch.zeros(1, dtype=torch.float32), positions)
    assert torch.allclose(torch.cos(ours), cos[0], atol=1e-6, rtol=0)
    assert torch.allclose(torch.sin(ours), sin[0], atol=1e-6, rtol=0)
    plain = 1.0 / (500_000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert not torch.allclose(reference.inv_freq, plain)  # the scaling is really on


def _rotary_angles(rank: int, world_size: int, hf_dir: str, positions: int) -> torch.Tensor:
    from models.backends import choose_backend

    from mcore_ranks import setup_parallel

    setup_parallel()
    arch = read_arch(hf_dir)
    family = family_of(arch)
    config = family.transformer_config(arch, use_cpu_initialization=True)
    gpt = family.build_model(arch, config, family.layer_spec(arch, choose_backend("cpu"), packed=False))
    return gpt.rotary_pos_emb(positions)[:, 0, 0, :]  # [positions, head_dim]: the angles per position


@pytest.mark.slow
@pytest.mark.parametrize("tensor_parallel, pipeline_parallel", [(2, 1), (1, 2)])
def test_converted_logits_match_transformers(model, tensor_parallel, pipeline_parallel):
    result = verify_conversion(
        model.hf, model.mcore, tensor_parallel=tensor_parallel, pipeline_parallel=pipeline_parallel
    )
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0, result.summary()


@pytest.mark.slow
def test_stock_megatron_core_loads_the_converted_checkpoint_strictly(model):
    results = run_distributed(stock_load_matches_ours, 2, str(model.mcore), 2, 1)
    assert all(count > 0 and as_shipped_fails is None for count, as_shipped_fails in results)


@pytest.mark.slow
def test_release_round_trip_is_bitwise_and_loads_with_the_family_class(model, qwen_tokenizer_dir):
    import transformers

    out = model.root / "release"
    args = ["--mcore", str(model.mcore), "--out", str(out), "--tokenizer", str(qwen_tokenizer_dir)]
    assert run_tool("convert_mcore_to_hf", args) == 0
    original, exported = HFSafetensorsReader(model.hf), HFSafetensorsReader(out)
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported.read(key), original.read(key)) for key in original.keys())
    config = json.loads((out / "config.json").read_text())
    family = family_of(read_arch(model.hf))
    assert config["architectures"] == [family.hf_model_class]
    assert arch_from_config(config) == read_arch(model.hf)
    release = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(release) is getattr(transformers, family.hf_model_class)
    ids = sample_token_ids(QWEN25_VOCAB_SIZE_SMALL, 2, 16)
    assert torch.equal(hf_logits(out, ids), hf_logits(model.hf, ids))


@pytest.fixture(scope="module")
def training(model):
    """The family's model converted and trained 3 steps in one process and at TP2 x PP2."""
    layouts = {"single": (1, []), "tp2xpp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"])}
    inputs, runs = train_tiny_model_at_layouts(model.root, model.hf, layouts)
    return SimpleNamespace(inputs=inputs, runs=runs)


@pytest.mark.slow
def test_first_loss_equals_transformers_conversation_by_conversation(model, training):
    assert training.runs["single"]["losses"][1] == pytest.approx(
        transformers_first_loss(model.hf, training.inputs), rel=1e-5
    )


@pytest.mark.slow
def test_tp2_pp2_trains_like_one_process(training):
    single, parallel = training.runs["single"]["losses"], training.runs["tp2xpp2"]["losses"]
    assert sorted(single) == sorted(parallel) == [1, 2, 3]
    for iteration, loss in single.items():
        assert parallel[iteration] == pytest.approx(loss, rel=1e-5), iteration


@pytest.mark.slow
def test_the_trained_checkpoint_exports_to_the_family_class(model, training, qwen_tokenizer_dir):
    """End to end: the TP2 x PP2 run's checkpoint -> a release transformers loads as the family's class,
    with the trained weights (the synthetic data records no real template: --chat-template names one)."""
    import transformers

    out = model.root / "trained-release"
    args = ["--mcore", str(model.root / "tp2xpp2"), "--out", str(out), "--tokenizer", str(qwen_tokenizer_dir)]
    assert run_tool("convert_mcore_to_hf", [*args, "--chat-template", "AM-thinking"]) == 0
    release = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(release) is getattr(transformers, family_of(read_arch(model.hf)).hf_model_class)
    before = HFSafetensorsReader(model.hf).read("model.layers.0.mlp.down_proj.weight")
    assert not torch.equal(release.model.layers[0].mlp.down_proj.weight, before)  # it trained
