"""Who made an output, and from what: recorded next to every checkpoint and dataset we write."""

from __future__ import annotations

import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("k2think-sft-mcore", "torch", "megatron-core", "transformers", "safetensors")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def tool_info(tool: str) -> dict[str, Any]:
    """The tool, its command line, package versions, the source commit and the time."""
    return {
        "tool": tool,
        "command": sys.argv,
        "versions": {name: _version(name) for name in _PACKAGES},
        "git_commit": _git_commit(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
