"""Qwen3 MoE (model_type qwen3_moe) against transformers' own Qwen3MoeForCausalLM, on a tiny model of 8
experts, 2 per token, 2 layers (testing/tiny_models.py): what its config reads to and what it refuses,
the mapping of the router and of every expert in both directions, the torch_dist layout megatron-core
gives its experts (keys and global shapes of its own sharded state dict; its own loader reads them at
EP2), parameters and FLOPs, the expert-parallel layout's rules; logits in one process (with and without
renormalised top-k probabilities) and after conversion at EP2 with either token dispatcher, TP2 + SP
with ETP1, and PP2 x EP2; the release round trip bitwise; training: the first loss equals transformers',
4 steps at EP2 x PP2 equal one process, and its checkpoint resumes in one process like one process.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from common.distributed import run_distributed
from common.errors import UnsupportedModelError
from convert.hf_to_mcore import plan_chunks
from convert.verify import sample_token_ids, verify_conversion
from formats.hf_safetensors import HFSafetensorsReader
from models.decoder.arch import MixtureOfExperts
from models.registry import arch_from_config, family_of, read_arch
from plan.layout import ParallelLayout
from plan.planner import local_parameters
from testing.fixtures import checkpoint_weights
from testing.hf_reference import hf_model
from testing.mappings import to_hf, to_mcore
from testing.tiny_models import QWEN25_VOCAB_SIZE_SMALL, make_tiny_model

from mcore_ranks import (
    megatron_logits_from_hf,
    moe_load_balancing_losses_from_hf,
    setup_parallel,
    stock_load_matches_ours,
)
from tools_runner import run_tool
from trainer_ranks import train_tiny_model_at_layouts, transformers_first_loss

TOKENS = sample_token_ids(QWEN25_VOCAB_SIZE_SMALL, 2, 24, seed=3)
EXPERTS, TOP_K, EXPERT_WIDTH, LAYERS, HIDDEN = 8, 2, 32, 2, 64
LR = 1e-1  # the training runs': large, so that a few steps move the weights far


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """The tiny Qwen3 MoE and its conversion by the tool."""
    root = tmp_path_factory.mktemp("qwen3_moe")
    hf = make_tiny_model(root / "hf", "qwen3_moe", tie_word_embeddings=True)
    mcore = root / "mcore"
    assert run_tool("convert_hf_to_mcore", ["--hf", str(hf), "--out", str(mcore), "--chunk-mb", "1"]) == 0
    return SimpleNamespace(hf=hf, mcore=mcore, root=root, arch=read_arch(hf))


def _config(moe) -> dict:
    return json.loads((moe.hf / "config.json").read_text())


def test_the_config_reads_to_qwen3_attention_with_experts(moe):
    arch = moe.arch
    assert arch.model_type == "qwen3_moe" and arch.qk_layernorm and arch.head_dim == 32
    assert arch.moe == MixtureOfExperts(EXPERTS, TOP_K, EXPERT_WIDTH, normalize_top_k=True)
    config = _config(moe)
    assert "num_local_experts" in config and "num_experts" not in config  # transformers 5 writes this
    hub_spelling = {k: v for k, v in config.items() if k != "num_local_experts"} | {"num_experts": EXPERTS}
    assert arch_from_config(hub_spelling) == arch  # the hub's configs say num_experts


@pytest.mark.parametrize(
    "change, message",
    [
        ({"decoder_sparse_step": 2}, "decoder_sparse_step=2; only a mixture of experts in every layer"),
        ({"mlp_only_layers": [0]}, r"mlp_only_layers=\[0\]; dense layers among the expert layers"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 is more than num_experts=8"),
        ({"moe_intermediate_size": None}, "no moe_intermediate_size"),
        ({"attention_bias": True}, "attention_bias=True"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "rope scaling 'yarn'"),
        ({"architectures": ["Qwen3ForCausalLM"]}, "only Qwen3 MoE causal LMs"),
    ],
)
def test_what_the_model_cannot_represent_is_refused_by_field(moe, change, message):
    with pytest.raises(UnsupportedModelError, match=message):
        arch_from_config({**_config(moe), **change}, "config.json")


def test_router_and_experts_map_both_ways_bitwise_each_hf_tensor_once(moe):
    reader = HFSafetensorsReader(moe.hf)
    mappings = family_of(moe.arch).bound_mappings(moe.arch)
    mcore = {m.key: to_mcore(m, [reader.read(key) for key in m.hf_keys]) for m in mappings}
    assert not reader.not_read_exactly_once()
    fresh = HFSafetensorsReader(moe.hf)
    for m in mappings:
        for key, tensor in zip(m.hf_keys, to_hf(m, mcore[m.key]), strict=True):
            assert torch.equal(tensor, fresh.read(key)), key
    # expert 5 of layer 1: fc1 = [gate; up], fc2 = down, and the router is the HF gate
    layer = "model.layers.1.mlp."
    fc1 = mcore["decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"]
    assert torch.equal(fc1[:EXPERT_WIDTH], fresh.read(layer + "experts.5.gate_proj.weight"))
    assert torch.equal(fc1[EXPERT_WIDTH:], fresh.read(layer + "experts.5.up_proj.weight"))
    assert torch.equal(mcore["decoder.layers.1.mlp.router.weight"], fresh.read(layer + "gate.weight"))
    assert "decoder.layers.1.mlp.linear_fc1.weight" not in mcore  # no dense MLP


@pytest.mark.slow  # a rank process: test-fast stays under 90 s
def test_the_torch_dist_layout_is_megatron_core_s_own(moe):
    """The converter's keys and global shapes equal those of megatron-core's sharded state dict of the
    model (local spec, one module per expert): every expert stacked along an axis after the layer's,
    under megatron-core's `experts.experts.` (TE's grouped experts use the same, per megatron-core's
    TEGroupedMLP.sharded_state_dict: unmeasured here, no TE), the pre-MLP norm under TE's name."""
    (sharded,) = run_distributed(_sharded_layout, 1, str(moe.hf))
    chunks = plan_chunks(moe.arch, HFSafetensorsReader(moe.hf), torch.float32)
    ours = {c.key: c.global_shape for c in chunks}
    assert ours == sharded
    assert ours["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (
        LAYERS,
        EXPERTS,
        2 * EXPERT_WIDTH,
        HIDDEN,
    )
    assert ours["decoder.layers.mlp.experts.experts.linear_fc2.weight"] == (
        LAYERS,
        EXPERTS,
        HIDDEN,
        EXPERT_WIDTH,
    )
    assert ours["decoder.layers.mlp.router.weight"] == (LAYERS, EXPERTS, HIDDEN)
    assert ours["decoder.layers.pre_mlp_layernorm.weight"] == (LAYERS, HIDDEN)
    # extra state: attention's three modules, two q/k norms and the pre-MLP norm per layer (TE), two
    # per expert and layer, the final norm
    objects = family_of(moe.arch).extra_state_objects(moe.arch)
    assert len(objects) == 6 * LAYERS + 2 * EXPERTS * LAYERS + 1
    assert (
        f"decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_1.7_{LAYERS}.{EXPERTS}" in objects
    )


def _sharded_layout(rank: int, world_size: int, hf_dir: str) -> dict[str, tuple[int, ...]]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from models.backends import choose_backend

    setup_parallel()
    arch = read_arch(hf_dir)
    family = family_of(arch)
    config = family.transformer_config(arch, use_cpu_initialization=True)
    model = family.build_model(arch, config, family.layer_spec(arch, choose_backend("cpu"), packed=False))
    layout = {}
    for value in model.sharded_state_dict().values():
        if isinstance(value, ShardedTensorFactory):  # the experts' fc1 ([gate; up]), made at save and load
            built = value.build()
            value = next(iter(built.values() if isinstance(built, dict) else built))
        if isinstance(value, ShardedTensor):
            layout[value.key] = tuple(value.global_shape)
    return layout


def test_parameters_and_flops_count_every_expert_and_the_active_ones(moe):
    for tied in (False, True):
        hf = make_tiny_model(moe.root / f"count-{tied}", "qwen3_moe", tie_word_embeddings=tied)
        assert local_parameters(read_arch(hf), ParallelLayout()) == hf_model(hf).num_parameters()
    family, arch = family_of(moe.arch), moe.arch
    attention = HIDDEN * (4 + 2 * 2) * 32 + 4 * 32 * HIDDEN
    active = attention + HIDDEN * EXPERTS + TOP_K * 3 * HIDDEN * EXPERT_WIDTH  # router + 2 experts
    assert family.dense_flops_per_token(arch) == LAYERS * 2 * active + 2 * HIDDEN * arch.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize(
    "world_size, sizes",
    [(2, dict(expert=2)), (4, dict(expert=4)), (4, dict(expert=2, pipeline=2))],
    ids=["ep2", "ep4", "ep2-pp2"],
)
def test_the_planner_s_parameters_per_rank_are_the_model_s(moe, world_size, sizes):
    """Each rank's parameters as megatron-core builds its stage (the experts split over EP, the rest
    replicated) equal the planner's count for that stage."""
    from plan.planner import stage_parameters

    layout = ParallelLayout(**sizes)
    built = run_distributed(_local_parameters, world_size, str(moe.mcore), layout)
    pp = layout.pipeline
    for first, last, count in built:
        assert count == stage_parameters(moe.arch, layout, first=first or pp == 1, last=last or pp == 1)
    expert_share = LAYERS // pp * EXPERTS * 3 * HIDDEN * EXPERT_WIDTH * (layout.expert - 1) // layout.expert
    assert (
        stage_parameters(moe.arch, ParallelLayout(pipeline=pp), True, pp == 1) - built[0][2] == expert_share
    )


def _local_parameters(rank: int, world_size: int, checkpoint: str, layout: ParallelLayout) -> tuple:
    from megatron.core import parallel_state

    from convert.verify import load_model_stage

    model = load_model_stage(checkpoint, layout, "cpu")
    first, last = parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    return first, last, sum(p.numel() for p in model.parameters())


def test_the_router_s_top_k_renormalisation_follows_the_config(moe):
    family = family_of(moe.arch)
    renormalised = family.transformer_config(moe.arch, use_cpu_initialization=True)
    assert not renormalised.moe_router_pre_softmax and renormalised.moe_router_topk == TOP_K
    raw = read_arch(make_tiny_model(moe.root / "raw", "qwen3_moe", norm_topk_prob=False))
    assert family.transformer_config(raw, use_cpu_initialization=True).moe_router_pre_softmax


@pytest.mark.slow
@pytest.mark.parametrize("normalize_top_k", [True, False])
def test_logits_match_transformers_in_one_process(moe, normalize_top_k):
    hf = (
        moe.hf
        if normalize_top_k
        else make_tiny_model(moe.root / "raw-topk", "qwen3_moe", norm_topk_prob=False)
    )
    with torch.no_grad():
        expected = hf_model(hf)(torch.tensor(TOKENS)).logits
    (ours,) = run_distributed(megatron_logits_from_hf, 1, str(hf), TOKENS)
    assert (ours - expected).abs().max().item() <= 1e-4


def test_expert_parallel_layouts_are_checked_against_the_model(moe):
    def problems(world_size: int, **sizes) -> str:
        return "; ".join(ParallelLayout(**sizes).problems(world_size=world_size, arch=moe.arch))

    assert problems(4, expert=2, pipeline=2) == ""
    assert problems(4, tensor=2, sequence_parallel=True, expert=2, expert_tensor=1) == ""
    assert "parallel.expert=3 must divide the 8 experts" in problems(3, expert=3)
    assert "not divisible by pipeline x expert x expert_tensor = 8" in problems(4, pipeline=2, expert=4)
    assert "needs parallel.sequence_parallel=true" in problems(2, tensor=2)
    assert "parallel.expert_tensor=64 must divide the experts' width (32)" in problems(64, expert_tensor=64)
    dense = read_arch(make_tiny_model(moe.root / "dense", "qwen3"))
    assert ParallelLayout(expert=2).problems(world_size=2, arch=dense) == [
        "parallel.expert and parallel.expert_tensor apply to a mixture-of-experts model only"
    ]
    # a checkpoint saved before experts were laid out reads as EP1 with ETP = its TP
    saved = {"tensor": 2, "pipeline": 1, "virtual_pipeline": None}
    assert ParallelLayout(tensor=2).weight_sharding_changes(saved) == {}
    assert ParallelLayout(tensor=2, expert=2).weight_sharding_changes(saved) == {"expert": (1, 2)}


@pytest.mark.slow  # a rank process: test-fast stays under 90 s
def test_the_dispatcher_asked_for_is_the_one_built(moe):
    built = [run_distributed(_dispatcher, 1, str(moe.mcore), name)[0] for name in ("alltoall", "allgather")]
    assert built == ["MoEAlltoAllTokenDispatcher", "MoEAllGatherTokenDispatcher"]


def _dispatcher(rank: int, world_size: int, checkpoint: str, name: str) -> str:
    from convert.verify import load_model_stage

    model = load_model_stage(checkpoint, ParallelLayout(), "cpu", moe_dispatcher=name)
    return type(model.decoder.layers[0].mlp.token_dispatcher).__name__


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout",
    [
        dict(expert_parallel=2),
        dict(expert_parallel=2, moe_dispatcher="allgather"),
        dict(tensor_parallel=2, expert_tensor_parallel=1, expert_parallel=2),
        dict(pipeline_parallel=2, expert_parallel=2),
    ],
    ids=["ep2-alltoall", "ep2-allgather", "tp2sp-etp1-ep2", "pp2-ep2"],
)
def test_converted_logits_match_transformers(moe, layout):
    result = verify_conversion(moe.hf, moe.mcore, **layout)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0, result.summary()


@pytest.mark.slow
def test_stock_megatron_core_loads_the_converted_experts_strictly_at_ep2(moe):
    """megatron-core's own local MoE spec, dist_checkpointing.load and a strict load_state_dict, experts
    split over 2 ranks, give the project loader's weights, with one entry of the spec's keys map dropped:
    as shipped, the spec names the pre-MLP norm as a dense layer's fused one, TE's MoE spec does not."""
    results = run_distributed(stock_load_matches_ours, 2, str(moe.mcore), 1, 1, 2)
    for count, as_shipped_fails in results:
        assert count > 0
        assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in as_shipped_fails


@pytest.mark.slow
def test_the_load_balancing_loss_is_transformers_per_layer_over_top_k(moe):
    """megatron-core's loss of each layer equals transformers' load_balancing_loss_func of that layer's
    router logits divided by k (megatron-core's f_e counts the k x T routings, transformers' the T
    tokens); transformers' model-level value pools the layers' tokens, which no sum of per-layer values
    is: model.moe_aux_loss_coef is megatron-core's, stated so (sft/config.py)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    (ours,) = run_distributed(moe_load_balancing_losses_from_hf, 1, str(moe.hf), TOKENS, 0.01)
    with torch.no_grad():
        router_logits = hf_model(moe.hf)(torch.tensor(TOKENS), output_router_logits=True).router_logits
    per_layer = [float(load_balancing_loss_func((logits,), EXPERTS, TOP_K)) for logits in router_logits]
    assert ours.tolist() == pytest.approx([value / TOP_K for value in per_layer], rel=1e-5)
    assert min(per_layer) > 1.0  # E x sum_e f_e P_e is 1 for perfectly balanced routing, more otherwise
    pooled = float(load_balancing_loss_func(router_logits, EXPERTS, TOP_K))
    assert pooled != pytest.approx(sum(per_layer), rel=1e-3)


@pytest.mark.slow
def test_release_round_trip_is_bitwise_and_loads_as_qwen3_moe(moe, qwen_tokenizer_dir):
    import transformers

    out = moe.root / "release"
    args = ["--mcore", str(moe.mcore), "--out", str(out), "--tokenizer", str(qwen_tokenizer_dir)]
    assert run_tool("convert_mcore_to_hf", args) == 0
    original, exported = HFSafetensorsReader(moe.hf), HFSafetensorsReader(out)
    assert exported.keys() == original.keys() and len(original.keys()) == 2 + LAYERS * (9 + 3 * EXPERTS)
    assert all(torch.equal(exported.read(key), original.read(key)) for key in original.keys())
    assert arch_from_config(json.loads((out / "config.json").read_text())) == moe.arch
    release = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(release) is transformers.Qwen3MoeForCausalLM


RESHARDED_AT = 2  # the EP2 x PP2 run's checkpoint that resumes in one process


@pytest.fixture(scope="module")
def training(moe):
    """The tiny MoE converted and trained 4 steps in one process, at EP2 x PP2 (4 ranks: the attention
    data-parallel over 2, the experts split over 2; its optimizer state saved per parameter at iteration
    2), from that checkpoint in one process, and in one process with the load-balancing loss."""
    layouts = {
        "single": (1, []),
        "ep2xpp2": (
            4,
            [
                "parallel.expert=2",
                "parallel.pipeline=2",
                "checkpoint.reshardable_optimizer=true",
                f"checkpoint.save_interval={RESHARDED_AT}",
            ],
        ),
        "ep1-resumed": (1, []),
        "aux-loss": (1, ["model.moe_aux_loss_coef=0.5"]),
    }
    inputs, runs = train_tiny_model_at_layouts(
        moe.root,
        moe.hf,
        layouts,
        lr=LR,
        iterations=4,
        resumed_from={"ep1-resumed": f"ep2xpp2/iter_{RESHARDED_AT:07d}"},
    )
    return SimpleNamespace(inputs=inputs, runs=runs)


@pytest.mark.slow
def test_first_loss_equals_transformers_conversation_by_conversation(moe, training):
    assert training.runs["single"]["losses"][1] == pytest.approx(
        transformers_first_loss(moe.hf, training.inputs), rel=1e-6
    )


@pytest.mark.slow
def test_ep2_pp2_trains_like_one_process(training):
    single, parallel = training.runs["single"]["losses"], training.runs["ep2xpp2"]["losses"]
    assert sorted(single) == sorted(parallel) == [1, 2, 3, 4]
    assert single[3] != single[1]  # it trained
    for iteration, loss in single.items():
        assert parallel[iteration] == pytest.approx(loss, rel=1e-5), iteration


@pytest.mark.slow
def test_a_checkpoint_saved_at_ep2_pp2_resumes_in_one_process_like_one_process(moe, training):
    """The optimizer's moments travel too: the fourth step's update needs them (a fresh Adam state would
    move the weights otherwise)."""
    single, resumed = training.runs["single"]["losses"], training.runs["ep1-resumed"]["losses"]
    assert sorted(resumed) == [3, 4]
    for iteration in (3, 4):
        assert resumed[iteration] == pytest.approx(single[iteration], rel=1e-5), iteration
    final, expected = (
        checkpoint_weights(moe.root / run / "iter_0000004") for run in ("ep1-resumed", "single")
    )
    assert final.keys() == expected.keys()
    assert any("experts" in key for key in final)
    for key, value in expected.items():
        assert torch.allclose(final[key], value, rtol=0, atol=LR * 1e-2), key


@pytest.mark.slow
def test_the_load_balancing_loss_trains_the_router_and_stays_out_of_the_reported_loss(training):
    single, balanced = training.runs["single"]["losses"], training.runs["aux-loss"]["losses"]
    assert balanced[1] == single[1]  # the same weights: the language-model loss alone is reported
    assert balanced[3] != pytest.approx(single[3], rel=1e-6)  # the gradients differed


def test_the_expert_settings_are_checked_against_the_model(moe):
    from sft.config import load_config

    def problems(coefficient: str, arch, *more: str) -> list[str]:
        overrides = [f"model.moe_aux_loss_coef={coefficient}", "model.random_init_config=x", *more]
        return load_config(None, overrides).run_problems(
            world_size=1, te_available=False, arch=arch, check_paths=False
        )

    assert "model.moe_aux_loss_coef=-1.0 must be >= 0 (0: off)" in problems("-1", moe.arch)
    dense = read_arch(make_tiny_model(moe.root / "dense-aux", "qwen3"))
    assert "model.moe_aux_loss_coef applies to a mixture-of-experts model only: set it to 0" in problems(
        "0.1", dense
    )
    assert not [p for p in problems("0.1", moe.arch) if "moe_aux_loss_coef" in p]
    # megatron-core's mlp module is a dense MLP: on a mixture of experts it would recompute nothing
    mlp = ["model.recompute=selective", "model.recompute_modules=[mlp]"]
    assert "model.recompute_modules: mlp does not apply to this model" in "; ".join(
        problems("0", moe.arch, *mlp)
    )
    moe_module = ["model.recompute=selective", "model.recompute_modules=[moe]"]
    assert "model.recompute_modules: moe does not apply to this model" in "; ".join(
        problems("0", dense, *moe_module)
    )
    assert not [p for p in problems("0", moe.arch, *moe_module) if "recompute" in p]
