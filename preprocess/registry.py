"""LLaMA-Factory's dataset registry (`dataset_info.json`): the entries a run names, read and checked.

An entry says where a dataset lives (`file_name`: a file or a directory of them, relative to the
registry's folder; or `hf_hub_url` with `subset`, `split`, `folder` and, beyond LLaMA-Factory 0.9.3,
a pinned `revision`), how it is written (`formatting`: alpaca or sharegpt; `columns`; `tags`) and how
many rows to draw (`num_samples`). The semantics are LLaMA-Factory 0.9.3's `DatasetAttr`: without
`columns` (`tags`) the defaults apply, and once `columns` (`tags`) is given every field it leaves out
is unset. What this project cannot train on (ranking, KTO, images, videos, audio, ModelScope,
scripts) is refused here, naming the entry, rather than read differently.

    entries = dataset_entries(Path("data/dataset_info.json"), ["am_thinking", "my_tools"])
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common.errors import InputError

log = logging.getLogger(__name__)

DATASET_INFO = "dataset_info.json"
FORMATTINGS = ("alpaca", "sharegpt")
# File extensions -> the `datasets` builder that reads them (LLaMA-Factory's FILEEXT2TYPE, those we read).
FILE_TYPES = {"json": "json", "jsonl": "json", "parquet": "parquet"}
_KNOWN_KEYS = {
    "file_name", "hf_hub_url", "revision", "subset", "split", "folder", "formatting", "ranking",
    "num_samples", "columns", "tags",
}  # fmt: skip
_REFUSED_KEYS = {
    "ms_hub_url": "ModelScope datasets are not supported: download it and use file_name",
    "om_hub_url": "Modelers datasets are not supported: download it and use file_name",
    "script_url": "dataset scripts are not supported: convert it to json/jsonl/parquet and use file_name",
    "cloud_file_name": "cloud files are not supported: download it and use file_name",
}
_REFUSED_COLUMNS = {
    "images": "multimodal data",
    "videos": "multimodal data",
    "audios": "multimodal data",
    "chosen": "preference (DPO) data",
    "rejected": "preference (DPO) data",
    "kto_tag": "KTO data",
}


@dataclass(frozen=True)
class Columns:
    """Row fields by role (LLaMA-Factory's names and defaults); None = not read."""

    prompt: str | None = "instruction"
    query: str | None = "input"
    response: str | None = "output"
    history: str | None = None
    messages: str | None = "conversations"
    system: str | None = None
    tools: str | None = None

    def required(self, formatting: str) -> list[str]:
        """The fields a row of this formatting is read from, as LLaMA-Factory's converters read them."""
        names = ("prompt", "query", "response", "history") if formatting == "alpaca" else ("messages",)
        return [getattr(self, n) for n in (*names, "system", "tools") if getattr(self, n) is not None]


@dataclass(frozen=True)
class Tags:
    """The keys and values of a sharegpt message (LLaMA-Factory's defaults: ShareGPT's own)."""

    role_tag: str | None = "from"
    content_tag: str | None = "value"
    user_tag: str | None = "human"
    assistant_tag: str | None = "gpt"
    observation_tag: str | None = "observation"
    function_tag: str | None = "function_call"
    system_tag: str | None = "system"


@dataclass(frozen=True)
class DatasetEntry:
    """One registry entry, resolved: its files (or hub location), formatting, fields and sampling."""

    name: str
    formatting: str = "alpaca"
    columns: Columns = field(default_factory=Columns)
    tags: Tags = field(default_factory=Tags)
    files: tuple[Path, ...] = ()  # a local dataset's files, sorted by name
    file_type: str | None = None  # their `datasets` builder (json or parquet)
    hub_repo: str | None = None
    revision: str | None = None
    subset: str | None = None
    split: str = "train"
    folder: str | None = None
    num_samples: int | None = None

    @property
    def where(self) -> str:
        """The dataset as error messages name it."""
        if self.hub_repo:
            return (
                f"dataset {self.name!r} (hub {self.hub_repo}@{self.revision or 'main'}, split {self.split})"
            )
        return f"dataset {self.name!r}"

    def record(self) -> dict[str, Any]:
        """The entry as a dataset's meta records it."""
        return {
            "name": self.name,
            "formatting": self.formatting,
            "columns": {f.name: getattr(self.columns, f.name) for f in fields(Columns)},
            "tags": (
                {f.name: getattr(self.tags, f.name) for f in fields(Tags)}
                if self.formatting == "sharegpt"
                else None
            ),
            "files": [str(path) for path in self.files],
            "hub": (
                {
                    "repo": self.hub_repo,
                    "revision": self.revision,
                    "subset": self.subset,
                    "folder": self.folder,
                }
                if self.hub_repo
                else None
            ),
            "split": self.split,
            "num_samples": self.num_samples,
        }


def dataset_entries(registry: Path, names: list[str]) -> list[DatasetEntry]:
    """The entries `names` of the registry `registry` (a dataset_info.json, or the folder holding one)."""
    path = Path(registry)
    if path.is_dir():
        path = path / DATASET_INFO
    info = read_registry(path)
    if not names:
        raise InputError(f"--dataset names none of the datasets of {path}: {', '.join(info) or '(none)'}")
    if len(set(names)) != len(names):
        raise InputError(f"--dataset names a dataset twice: {','.join(names)} (num_samples repeats one)")
    missing = [name for name in names if name not in info]
    if missing:
        raise InputError(
            f"{path} has no dataset {', '.join(map(repr, missing))}; it has {', '.join(info) or '(none)'}"
        )
    return [entry_from_registry(name, info[name], path.parent, path) for name in names]


def read_registry(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"--dataset-info {path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise InputError(f"{path} must map each dataset name to an object, as LLaMA-Factory's does")
    return info


def entry_from_registry(name: str, attrs: dict[str, Any], folder: Path, registry: Path) -> DatasetEntry:
    """One entry, checked, with LLaMA-Factory's defaults; `folder` resolves its `file_name`."""
    where = f"{registry}: dataset {name!r}"
    for key, why in _REFUSED_KEYS.items():
        if key in attrs and "hf_hub_url" not in attrs and "file_name" not in attrs:
            raise InputError(f"{where}: {why}")
    unknown = sorted(set(attrs) - _KNOWN_KEYS - set(_REFUSED_KEYS))
    if unknown:
        log.warning("%s: ignoring keys this preprocessor does not read: %s", where, ", ".join(unknown))
    formatting = attrs.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise InputError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    if attrs.get("ranking"):
        raise InputError(f"{where}: ranking (preference) datasets are not supervised fine-tuning data")
    columns = _fields_from(Columns, attrs, "columns", where)
    tags = _fields_from(Tags, attrs, "tags", where)
    num_samples = attrs.get("num_samples")
    if num_samples is not None and (
        not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1
    ):
        raise InputError(f"{where}: num_samples must be a positive integer, got {num_samples!r}")
    location: dict[str, Any]
    if "hf_hub_url" in attrs:
        location = {
            "hub_repo": attrs["hf_hub_url"],
            "revision": attrs.get("revision"),
            "folder": attrs.get("folder"),
        }
        if location["revision"] is None:
            log.warning(
                "%s: no `revision` pinned; the hub's current main is read (pin one to reproduce)", where
            )
    elif "file_name" in attrs:
        files, file_type = _local_files(folder / attrs["file_name"], where)
        location = {"files": files, "file_type": file_type}
    else:
        raise InputError(f"{where}: needs `file_name` (relative to {folder}) or `hf_hub_url`")
    return DatasetEntry(
        name=name,
        formatting=formatting,
        columns=columns,
        tags=tags,
        subset=attrs.get("subset"),
        split=attrs.get("split", "train"),
        num_samples=num_samples,
        **location,
    )


def _fields_from(kind: type, attrs: dict[str, Any], key: str, where: str):
    """Columns or Tags: LLaMA-Factory's defaults without `key`; only what `key` lists with it."""
    if key not in attrs:
        return kind()
    given = attrs[key]
    if not isinstance(given, dict):
        raise InputError(f"{where}: `{key}` must be an object")
    if key == "columns":
        for column, what in _REFUSED_COLUMNS.items():
            if given.get(column):
                raise InputError(f"{where}: column {column!r} ({what}) cannot be trained on here")
    names = {f.name for f in fields(kind)}
    unknown = sorted(set(given) - names - set(_REFUSED_COLUMNS))
    if unknown:
        raise InputError(f"{where}: unknown {key} {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return kind(**{name: given.get(name) for name in names})


def _local_files(path: Path, where: str) -> tuple[tuple[Path, ...], str]:
    """A file, or a directory's files (sorted; LLaMA-Factory lists them unsorted), all of one type."""
    if path.is_dir():
        files = tuple(sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")))
        if not files:
            raise InputError(f"{where}: the directory {path} holds no files")
    elif path.is_file():
        files = (path,)
    else:
        raise InputError(f"{where}: file_name {path} does not exist")
    types = {FILE_TYPES.get(p.suffix.lstrip(".")) for p in files}
    if None in types:
        odd = next(p for p in files if FILE_TYPES.get(p.suffix.lstrip(".")) is None)
        raise InputError(f"{where}: {odd} is not one of the file types {', '.join(FILE_TYPES)}")
    if len(types) > 1:
        raise InputError(f"{where}: the files of {path} must all be json/jsonl or all parquet")
    return files, types.pop()
