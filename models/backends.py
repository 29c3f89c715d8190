"""Which kernels run here, and why: Transformer Engine's fused layers, or megatron-core's local
(pure torch) layers with the project's packed attention.

Transformer Engine (TE) is an optional accelerator: it is used on CUDA when its torch extension
imports, unless the configuration asks for torch. Every entry point that builds a model asks
`choose_backend` and logs the answer, so a run's log says which path it took and why.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Requested = Literal["auto", "te", "torch"]


@functools.cache
def _te_importable() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401  (the extension, not just the Python package)
    except Exception:  # ImportError, or an OSError/RuntimeError from a broken CUDA extension
        return False
    return True


def te_available(device: str) -> bool:
    """Whether Transformer Engine can run here: on CUDA, when its torch extension imports."""
    return device == "cuda" and _te_importable()


@dataclass(frozen=True)
class Backend:
    transformer_engine: bool
    reason: str  # why this backend, for the log

    def describe(self) -> str:
        if self.transformer_engine:
            return "Transformer Engine (fused attention, norms and linear layers)"
        return f"megatron-core local layers, pure torch ({self.reason})"


def choose_backend(device: str, requested: Requested = "auto") -> Backend:
    """Transformer Engine when requested or available ("auto"), else the torch path, with the reason."""
    if requested == "torch":
        return Backend(False, "model.attention=torch")
    if te_available(device):
        return Backend(True, "Transformer Engine is importable on CUDA")
    reason = f"running on {device}" if device != "cuda" else "Transformer Engine is not importable"
    return Backend(False, reason)
