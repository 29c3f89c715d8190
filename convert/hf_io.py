"""Lazy reading of Hugging Face safetensors checkpoints (sharded with an index, or a single file).

Tensors are read one at a time through safetensors' memory maps, so reading a layer costs that
layer's memory, not the model's; every read is recorded, so a converter can prove each tensor was
consumed exactly once.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch


class HFSafetensorsReader:
    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        single = self.model_dir / "model.safetensors"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                weight_map = {key: single.name for key in f.keys()}
        else:
            raise FileNotFoundError(f"{self.model_dir} has neither model.safetensors.index.json nor model.safetensors")
        missing = sorted({name for name in weight_map.values() if not (self.model_dir / name).is_file()})
        if missing:
            raise FileNotFoundError(f"{self.model_dir}: shard(s) listed in the index are missing: {', '.join(missing)}")
        self.weight_map = weight_map
        self._open = safe_open
        self._handles: dict[str, object] = {}
        self.reads: Counter = Counter()

    def keys(self) -> set[str]:
        return set(self.weight_map)

    def read(self, key: str) -> torch.Tensor:
        if key not in self.weight_map:
            raise KeyError(f"{key} is not in the checkpoint at {self.model_dir}")
        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = self._open(str(self.model_dir / name), "pt")
        self.reads[key] += 1
        return self._handles[name].get_tensor(key)
