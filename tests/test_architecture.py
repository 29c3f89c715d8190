"""The package structure of docs/architecture.md, read from the source: dependencies point one way, the
stage packages never import each other, production code never imports the test fixtures."""

from __future__ import annotations

from pathlib import Path

from testing.import_graph import ALLOWED, _imported_packages, package_graph, violations

ROOT = Path(__file__).resolve().parents[1]


def test_packages_depend_one_way():
    graph = package_graph(ROOT)
    assert not violations(graph), violations(graph)
    assert ("sft", "models") in graph and ("convert", "formats") in graph  # the graph is really read
    for stage in ("preprocess", "convert", "sft"):
        assert not ALLOWED[stage] & {"preprocess", "convert", "sft", "testing"}


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
