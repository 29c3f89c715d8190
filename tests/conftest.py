"""Session fixtures shared by the tests: the offline Qwen2.5 tokenizer, the synthetic AM-Thinking
snapshot and its aligned parquet, and tiny random Qwen2 models (tied and untied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a hub during tests
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    from testing.tokenizer import build_qwen25_tokenizer

    return build_qwen25_tokenizer(tmp_path_factory.mktemp("qwen25_tokenizer"))


@pytest.fixture(scope="session")
def llama3_tokenizer_dir(tmp_path_factory) -> Path:
    """The Qwen2.5 vocabulary with Llama 3's special tokens and conventions (bos first, no pad)."""
    from testing.tokenizer import build_llama3_style_tokenizer

    return build_llama3_style_tokenizer(tmp_path_factory.mktemp("llama3_tokenizer"))


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_tokenizer_dir):
    from formats.tokenizer import load_tokenizer

    return load_tokenizer(qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def sample_snapshot(tmp_path_factory):
    from testing.sample_data import write_sample_snapshot

    return write_sample_snapshot(tmp_path_factory.mktemp("am_snapshot"))


@pytest.fixture(scope="session")
def aligned_parquet(sample_snapshot, tmp_path_factory) -> Path:
    from preprocess.align import align_snapshot

    out = tmp_path_factory.mktemp("aligned") / "am.parquet"
    align_snapshot(sample_snapshot.root, out)
    return out


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def tiny_qwen2_dir(request, tmp_path_factory) -> Path:
    """Untied with RMSNorm eps 1e-6 (Qwen2.5 7B+), tied with eps 1e-5 (as some small Qwen2 configs)."""
    from testing.tiny_models import make_tiny_model

    tied = request.param
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_qwen2"),
        "qwen2",
        tie_word_embeddings=tied,
        rms_norm_eps=1e-5 if tied else 1e-6,
    )
