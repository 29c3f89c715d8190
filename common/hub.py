"""Downloading a dataset from the Hugging Face Hub at a pinned revision, with named errors.

    snapshot = download_dataset("HuggingFaceH4/MATH-500", "ff5b2025...", where="math500",
                                fix="pass --revision math500=COMMIT", allow_patterns=["test.jsonl"])

The files land in the Hugging Face cache (HF_HOME, or `cache_dir`) and the snapshot directory is
returned. Every way the hub can refuse becomes a `InputError` that says which dataset and revision,
and what to do: an unknown revision, an unknown or private repository, a gated one without an accepted
token, an unreachable hub with nothing cached, a listed file that cannot be fetched. The token is
huggingface_hub's own (HF_TOKEN, or `hf auth login`), never a flag: it must not land in shell history.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.errors import InputError


def download_dataset(
    repo: str,
    revision: str | None,
    *,
    fix: str,
    where: str = "",
    offline: str = "download on a machine with access and copy the files",
    allow_patterns: Sequence[str] | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """The snapshot directory of dataset `repo` at `revision` (None: the hub's main). `fix` says how to
    choose another revision, `offline` what to do without the hub; `where`, if given, opens every error
    message (the entry or benchmark it is for)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at, where = f"{repo}@{revision or 'main'}", f"{where}: " if where else ""
    try:
        return Path(
            snapshot_download(
                repo_id=repo,
                repo_type="dataset",
                revision=revision,
                cache_dir=None if cache_dir is None else str(cache_dir),
                allow_patterns=None if allow_patterns is None else list(allow_patterns),
            )
        )
    except RevisionNotFoundError as exc:
        raise InputError(f"{where}the hub has no revision {revision} of the dataset {repo}: {fix}") from exc
    except GatedRepoError as exc:  # before its base class, RepositoryNotFoundError
        raise InputError(
            f"{where}{repo} is gated: accept its terms at https://huggingface.co/datasets/{repo} with "
            "your account, then set HF_TOKEN to a token of that account (or run `hf auth login`)"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise InputError(
            f"{where}the hub has no dataset {repo} (or it is private and HF_TOKEN is not set)"
        ) from exc
    except LocalEntryNotFoundError as exc:  # unreachable and not cached; a subclass of the next one
        raise InputError(
            f"{where}cannot reach the hub for {at} and it is not in the cache: check the network and "
            f"HF_ENDPOINT, or {offline}"
        ) from exc
    except EntryNotFoundError as exc:
        raise InputError(
            f"{where}a file of {at} is listed by the hub but cannot be downloaded ({exc}); retry"
        ) from exc
