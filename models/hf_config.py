"""Where a model's Hugging Face config is found: the same for every model family.

A path may be the config file itself, an HF model directory (config.json), or a torch_dist checkpoint of
this project (hf_config.json, the HF config it was converted from).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from common.errors import InputError
from formats.run_files import HF_CONFIG_FILE

HF_CONFIG_NAME = "config.json"


def find_hf_config(path: str | Path) -> Path:
    """The HF config of `path`: the file itself, DIR/config.json (an HF model) or DIR/hf_config.json (a
    torch_dist checkpoint of this project)."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (HF_CONFIG_NAME, HF_CONFIG_FILE):
        if (path / name).is_file():
            return path / name
    raise InputError(
        f"{path}: no {HF_CONFIG_NAME} or {HF_CONFIG_FILE} found; pass a Hugging Face model directory, its "
        "config.json, or a checkpoint written by convert_hf_to_mcore.py or pretrain_sft.py"
    )


def read_hf_config(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(the HF config of `path` as a dict, the file it was read from)."""
    config_file = find_hf_config(path)
    try:
        return json.loads(config_file.read_text()), config_file
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{config_file} is not valid JSON ({exc}); pass the model's own config.json"
        ) from exc
