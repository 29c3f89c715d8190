"""Installing on a GPU cluster: the cluster requirements are pyproject's pins less torch, and in an
environment that already has a torch (here, this venv's), installing them resolves without touching it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

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
