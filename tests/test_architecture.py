"""The package structure of docs/architecture.md, read from the source: dependencies point one way, the
stage packages never import each other, production code never imports the test fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from testing.import_graph import ALLOWED, _imported_packages, family_imports, package_graph, violations

ROOT = Path(__file__).resolve().parents[1]


def test_packages_depend_one_way():
    graph = package_graph(ROOT)
    assert not violations(graph), violations(graph)
    assert ("sft", "models") in graph and ("convert", "formats") in graph  # the graph is really read
    assert ("sft", "plan") in graph and ("plan", "models") in graph
    stages = {"preprocess", "convert", "sft", "evaluation"}
    for stage in stages:
        assert not ALLOWED[stage] & (stages | {"testing"})


def test_entry_points_do_not_import_test_fixtures():
    entry_points = [ROOT / "pretrain_sft.py", *sorted((ROOT / "tools").glob("*.py"))]
    offenders = [p.name for p in entry_points if p.name != "demo.py" and "testing" in _imported_packages(p)]
    assert not offenders
    assert "testing" in _imported_packages(ROOT / "tools" / "demo.py")  # the demo's sample and tiny model


def test_a_sideways_import_is_caught(tmp_path):
    for package in ("sft", "convert"):
        (tmp_path / package).mkdir()
    (tmp_path / "sft" / "trainer.py").write_text("def f():\n    from convert.hf_to_mcore import x\n")
    assert violations(package_graph(tmp_path)) == ["sft imports convert (1x)"]


def test_only_the_registry_knows_the_model_families(tmp_path):
    assert family_imports(ROOT) == []
    for package in ("llama", "decoder"):
        (tmp_path / "models" / package).mkdir(parents=True)
        (tmp_path / "models" / package / "__init__.py").write_text("")
    # A family on the shared decoder is fine; the trainer or a sibling module reaching either is not.
    (tmp_path / "models" / "llama" / "__init__.py").write_text("from models.decoder.arch import A\n")
    (tmp_path / "models" / "hf_config.py").write_text("from models.decoder import flops\n")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "trainer.py").write_text("def f():\n    from models.llama import arch\n")
    assert family_imports(tmp_path) == [
        "models/hf_config.py imports models.decoder",
        "sft/trainer.py imports models.llama",
    ]


def test_the_registry_finds_the_family_of_a_checkpoint_and_refuses_others(tiny_qwen2_dir, tmp_path):
    import json

    import transformers

    from common.errors import UnsupportedModelError
    from models.qwen2 import FAMILY as QWEN2
    from models.registry import family_for_config, family_of, read_arch, supported_model_types

    arch = read_arch(tiny_qwen2_dir)
    assert family_of(arch) is QWEN2 and "qwen2" in supported_model_types()
    assert getattr(transformers, QWEN2.hf_model_class) is transformers.Qwen2ForCausalLM
    assert getattr(transformers, QWEN2.hf_config_class) is transformers.Qwen2Config
    for model_type in supported_model_types():  # every family's classes are transformers' for its type
        family = family_for_config({"model_type": model_type})
        model_class = getattr(transformers, family.hf_model_class)
        assert model_class.config_class is getattr(transformers, family.hf_config_class)
        assert model_class.config_class.model_type == family.model_type == model_type
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(
        UnsupportedModelError,
        match=r"config.json: model_type='gpt2'.*supported model types are qwen2, qwen3, qwen3_moe, llama "
        r"\(Qwen2 / Qwen2.5, Qwen3, Qwen3 MoE, Llama 3.x\)",
    ):
        read_arch(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_moe"}))
    with pytest.raises(UnsupportedModelError, match="Qwen2 MoE is not supported yet"):
        read_arch(tmp_path)
