"""Loading and fingerprinting the tokenizer of a local Hugging Face model directory.

Real runs load the tokenizer shipped with the base model (a snapshot of `Qwen/Qwen2.5-32B`); tests and
the demo build the same vocabulary offline (`testing/tokenizer.py`). The preprocessor tokenises with
the Rust backend alone (`load_backend_tokenizer`, no transformers import); the exporter needs the
transformers wrapper (`load_tokenizer`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.errors import InputError


def _require_tokenizer_json(path: Path) -> Path:
    if not (path / "tokenizer.json").is_file():
        raise InputError(
            f"{path} has no tokenizer.json: pass a local Hugging Face tokenizer directory "
            "(e.g. a snapshot of Qwen/Qwen2.5-32B, or one built by `python -m testing.tokenizer DIR`)"
        )
    return path / "tokenizer.json"


def load_tokenizer(path: str | Path):
    """Loads a local HF tokenizer directory, with a clear error when it is not one."""
    from transformers import AutoTokenizer

    path = Path(path)
    _require_tokenizer_json(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.is_fast:
        raise InputError(f"{path}: a fast (Rust) tokenizer is required (tokenizer.json)")
    return tokenizer


def load_backend_tokenizer(path: str | Path):
    """The Rust tokenizer of a local HF tokenizer directory, without importing transformers (seconds).

    transformers' fast tokenizer wraps exactly this object; it would also register any added token
    listed in tokenizer_config.json but missing from tokenizer.json, so such a mismatch is refused
    here rather than tokenised differently.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    backend = Tokenizer.from_file(str(_require_tokenizer_json(path)))
    config_file = path / "tokenizer_config.json"
    declared = (
        json.loads(config_file.read_text()).get("added_tokens_decoder", {}) if config_file.is_file() else {}
    )
    for token_id, token in declared.items():
        if backend.token_to_id(token["content"]) != int(token_id):
            raise InputError(
                f"{config_file} declares added token {token['content']!r} at id {token_id}, but "
                "tokenizer.json "
                f"has it at {backend.token_to_id(token['content'])}: the tokenizer files are inconsistent"
            )
    return backend


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 over the files that determine tokenisation (vocabulary, merges, added tokens, config)."""
    digest = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        file = Path(path) / name
        if file.is_file():
            digest.update(name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


def declared_special_token(path: str | Path, role: str) -> str | None:
    """The token a local HF tokenizer declares for `role` ("bos_token", "eos_token", "pad_token"), as
    transformers reads it (tokenizer_config.json, else special_tokens_map.json), or None."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = Path(path) / name
        if file.is_file():
            value = json.loads(file.read_text()).get(role)
            if value is not None:
                return value["content"] if isinstance(value, dict) else value
    return None
