"""Atomic outputs and content fingerprints.

Every output of the pipeline is written under a temporary name and renamed into place only when it is
complete, so an interrupted run never leaves a file that looks finished. Fingerprints identify inputs
(files, tokenizers) in the metadata written next to outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import InputError

_TMP_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """The temporary name `path` is written under before it is committed."""
    path = Path(path)
    return path.with_name(path.name + _TMP_SUFFIX)


def commit(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Moves a finished temporary file into place (atomic on one file system)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path to write; renames it to `path` on success, removes it on failure."""
    tmp = partial_path(path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields an empty temporary directory to fill; on success it replaces `path` (which must not exist
    unless `force`), on failure it is removed. A leftover from an earlier crash is cleared first."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} already exists; pass --force to replace it")
    tmp = partial_path(path)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_directory(tmp, path)


def publish_directory(tmp: str | os.PathLike, final: str | os.PathLike) -> None:
    """Renames the finished directory `tmp` to `final`. An existing `final` stays complete until the new
    one is in place: it is moved aside first and deleted only after the rename, so there is never a
    moment without a complete copy under one of the two names."""
    tmp, final = Path(tmp), Path(final)
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(
            json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n", encoding="utf-8"
        )


def file_fingerprint(path: str | os.PathLike, full_hash: bool = False) -> dict[str, Any]:
    """Name, size, mtime and a sha256 (of the whole file, or of its first and last MiB when large).

    Hashing 100 GB of parquet would dominate a preprocessing run, so by default files over 64 MiB are
    identified by size plus the hash of their ends, which catches replaced or truncated files.
    """
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256()
    chunk = 1 << 20
    with open(path, "rb") as f:
        if full_hash or stat.st_size <= 64 * chunk:
            for block in iter(lambda: f.read(16 * chunk), b""):
                digest.update(block)
            kind = "sha256"
        else:
            digest.update(f.read(chunk))
            f.seek(stat.st_size - chunk)
            digest.update(f.read(chunk))
            kind = "sha256_head_tail_1MiB"
    return {"path": str(path), "size": stat.st_size, "mtime": int(stat.st_mtime), kind: digest.hexdigest()}
