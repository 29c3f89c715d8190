"""Runs a tools/*.py entry point (or the top-level pretrain_sft.py) in-process (its `main(argv)`), as the
command line would."""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_tool(name: str):
    path = TOOLS / f"{name}.py" if (TOOLS / f"{name}.py").is_file() else TOOLS.parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name: str, argv: list[str]) -> int:
    return load_tool(name).main(argv)
