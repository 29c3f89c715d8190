"""Installing on a GPU cluster: the cluster requirements are pyproject's pins less torch, and in an
environment that already has a torch (here, this venv's), installing them resolves without touching it."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_cluster_requirements_are_the_pins_without_torch():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = [dep for dep in pyproject["dependencies"] if dep.split("==")[0].lower() != "torch"]
    assert _requirements(ROOT / "requirements" / "cluster.txt") == expected
    assert any(dep.startswith("torch==") for dep in pyproject["dependencies"])  # the CPU set-up still pins it
    assert pyproject["requires-python"] == ">=3.11,<3.13"


def test_installing_them_keeps_the_torch_that_is_there(tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-index",
            "--quiet",
            "--report",
            str(report),
            "-r",
            str(ROOT / "requirements" / "cluster.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    would_install = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    assert "torch" not in would_install, would_install


@pytest.mark.slow
def test_the_wheel_holds_every_package_and_each_family_and_tool_loads_from_it(tmp_path):
    """What a cluster image's `pip install .` gets: a wheel with every package of the tree, from which
    every registered model family loads outside the source tree (without the editable install's path),
    and a console script for every tool that answers --help from there."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    source = tmp_path / "source"  # the tracked files only: no build/ left by an earlier build
    for path in tracked.stdout.splitlines():
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, source / path)
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *isolation, "-w", str(dist)]
    subprocess.run([*build, str(source)], check=True, cwd=tmp_path)
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        held = set(archive.namelist())
    packages = [
        path
        for path in tracked.stdout.splitlines()
        if path.endswith("/__init__.py") and path.split("/")[0] not in ("tests", "bench")
    ]
    assert packages and [path for path in packages if path not in held] == []
    assert "pretrain_sft.py" in held
    scripts = _console_scripts(_archive_text(wheel, "entry_points.txt"))
    tools = sorted(p.stem for p in (ROOT / "tools").glob("*.py") if p.stem not in ("__init__", "demo"))
    assert sorted(target.split(":")[0] for target in scripts.values()) == sorted(
        ["pretrain_sft", *(f"tools.{name}" for name in tools)]
    )
    # -S: no .pth file runs, so the editable install's finder does not put the checkout back on the path
    probe = f"""
import importlib, sys
sys.path[:0] = [{str(tmp_path / "site")!r}]
sys.path.append({sysconfig.get_paths()["purelib"]!r})
from models.registry import _PACKAGES, supported_model_types
for model_type in supported_model_types():
    module = importlib.import_module(_PACKAGES[model_type])
    assert module.__file__.startswith({str(tmp_path / "site")!r}), module.__file__
    print(model_type, module.FAMILY.__class__.__name__)
"""
    done = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(line.split()[0] for line in done.stdout.splitlines()) == sorted(_supported_model_types())
    # every console script's target, imported from the wheel, answers --help (one process for all)
    help_probe = f"""
import contextlib, importlib, io, sys
sys.path[:0] = [{str(tmp_path / "site")!r}]
sys.path.append({sysconfig.get_paths()["purelib"]!r})
for name, target in {sorted(scripts.items())!r}:
    module_name, function = target.split(":")
    module = importlib.import_module(module_name)
    assert module.__file__.startswith({str(tmp_path / "site")!r}), module.__file__
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            status = getattr(module, function)(["--help"])
        except SystemExit as exit:
            status = exit.code
    assert status in (0, None) and "usage:" in out.getvalue(), (name, status)
    print(name)
"""
    done = subprocess.run(
        [sys.executable, "-S", "-c", help_probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == sorted(scripts)


def _archive_text(wheel: Path, name: str) -> str:
    """The text of the wheel's dist-info file `name`."""
    with zipfile.ZipFile(wheel) as archive:
        (path,) = [p for p in archive.namelist() if p.endswith(f".dist-info/{name}")]
        return archive.read(path).decode()


def _console_scripts(entry_points: str) -> dict[str, str]:
    """[console_scripts] of an entry_points.txt: script name -> module:function."""
    scripts, section = {}, None
    for line in entry_points.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif line and section == "console_scripts":
            name, target = (part.strip() for part in line.split("=", 1))
            scripts[name] = target
    return scripts


def _supported_model_types() -> list[str]:
    from models.registry import supported_model_types

    return list(supported_model_types())


def test_the_evaluation_environment_runs_the_harness_and_grader_the_tests_run():
    """requirements/eval-gpu.txt (vLLM's own environment) pins lm-eval and math-verify at the versions the
    CPU tests check; only the backend and what vLLM pins (torch, transformers) differ."""

    def pins(requirements: list[str]) -> dict[str, str]:
        return {
            dep.split("==")[0].split("[")[0].lower(): dep.split("==")[1]
            for dep in requirements
            if "==" in dep
        }

    project = pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    evaluation = pins(_requirements(ROOT / "requirements" / "eval-gpu.txt"))
    assert {name: evaluation.get(name) for name in ("lm-eval", "math-verify")} == {
        name: project[name] for name in ("lm-eval", "math-verify")
    }
    assert "vllm" in evaluation and "torch" not in project.keys() & evaluation.keys()  # vLLM brings its own
