"""megatron-core torch_dist checkpoint -> Hugging Face release of its model family, streamed.

    python tools/convert_mcore_to_hf.py --mcore runs/k2think --out release/K2-Think-SFT

Reads a converted checkpoint, or a training run directory (its latest complete iteration, or
`iteration`), whatever tensor/pipeline layout it was saved at, and writes the family's weights (e.g.
`Qwen2ForCausalLM`) as sharded safetensors with their index, `config.json`, `generation_config.json`,
and the tokenizer with the chat template the training data was encoded with (recorded by the trainer in
the checkpoint) installed, its stop token as EOS, so transformers and serving engines format prompts
exactly as in training. Tensors are streamed a few rows at a time from the checkpoint's chunks into the
safetensors files, the next piece read while the current one is written: anonymous memory stays at a few
pieces of `max_piece_bytes`, or of the largest stored chunk where a trainer saved larger ones (DCP reads
a stored chunk whole, so a piece never splits one).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.errors import CheckpointError, InputError
from common.files import atomic_directory, write_json_atomic
from common.provenance import tool_info
from formats.chat_template import AM_THINKING, ChatTemplate, template_named
from formats.hf_safetensors import TensorSpec, write_sharded
from formats.run_files import HF_CONFIG_FILE, PROVENANCE_FILE, TOKENIZER_DIR, TRAINING_DATA_FILE
from formats.tokenizer import load_tokenizer
from formats.torch_dist import TorchDistReader, read_hf_config, resolve_checkpoint
from models.registry import Arch, ModelFamily, arch_from_config, family_of
from models.weight_mapping import BoundMapping

from .hf_to_mcore import DEFAULT_CHUNK_BYTES, DTYPES

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size, "5GB"


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint: Path
    shards: int
    bytes_written: int
    seconds: float


def check_checkpoint(arch: Arch, reader: TorchDistReader, mappings: list[BoundMapping]) -> torch.dtype:
    """Every megatron tensor is present with its global shape and one floating dtype, returned."""
    problems, dtypes = [], set()
    for m in mappings:
        if m.dist_key not in reader.tensors:
            problems.append(f"{m.dist_key} missing")
        elif reader.shape(m.dist_key) != m.dist_shape:
            problems.append(
                f"{m.dist_key}: shape {reader.shape(m.dist_key)}, expected {m.dist_shape} from hf_config.json"
            )
        else:
            dtypes.add(reader.dtype(m.dist_key))
    if len(dtypes) > 1 or any(not d.is_floating_point for d in dtypes):
        problems.append(f"model tensors must share one floating dtype; found {sorted(map(str, dtypes))}")
    if problems:
        raise CheckpointError(f"{reader.path}: " + "; ".join(sorted(set(problems))[:6]))
    return dtypes.pop()


def _read_mcore_rows(reader: TorchDistReader, m: BoundMapping, start: int, stop: int) -> torch.Tensor:
    sizes = (1,) * len(m.lead) + (stop - start, *m.mcore_shape[1:])
    return reader.read(m.dist_key, m.dist_offsets(start), sizes).view(stop - start, *m.mcore_shape[1:])


def _largest_stored_chunk_bytes(reader: TorchDistReader, key: str) -> int:
    metadata = reader.tensors[key]
    return max(math.prod(chunk.sizes) for chunk in metadata.chunks) * metadata.properties.dtype.itemsize


def _hf_rows_reader(reader: TorchDistReader, mappings: list[BoundMapping], dtype: torch.dtype):
    owner = {key: (m, i) for m in mappings for i, key in enumerate(m.hf_keys)}

    def read_rows(spec: TensorSpec, start: int, stop: int) -> torch.Tensor:
        m, i = owner[spec.key]
        blocks = list(m.blocks_for_hf_rows(i, start, stop))
        lo, hi = min(b[0] for b in blocks), max(b[0] + b[2] for b in blocks)
        region = _read_mcore_rows(reader, m, lo, hi)  # one read covering every block (QKV: the fused tensor)
        if len(blocks) == 1:
            return region.to(dtype)
        out = torch.empty((stop - start, *spec.shape[1:]), dtype=dtype)
        for mcore_row, dest, count in blocks:
            out[dest : dest + count] = region[mcore_row - lo : mcore_row - lo + count]
        return out

    return read_rows


def release_template(checkpoint: Path, requested: str | None = None) -> ChatTemplate:
    """The chat template the release serves: `requested`, else the one the checkpoint's training data was
    encoded with (training_data.json, written by the trainer), else (a checkpoint that was converted and
    never trained) the recipe's AM-thinking template."""
    if requested is not None:
        return template_named(requested)
    name = _training_data(checkpoint).get("chat_template")
    if name is not None:
        return template_named(name, str(checkpoint / TRAINING_DATA_FILE))
    log.info(
        "%s records no training data's chat template: the release gets %s (--chat-template to choose)",
        checkpoint,
        AM_THINKING.name,
    )
    return AM_THINKING


def release_thinking(checkpoint: Path, template: ChatTemplate, requested: bool | None = None) -> bool:
    """The default of a reasoning template's `enable_thinking` in the release: `requested`, else the
    setting the training data was encoded with, else LLaMA-Factory's default (thinking)."""
    if requested is not None:
        if not template.reasoning:
            raise InputError(
                f"--{'' if requested else 'no-'}enable-thinking applies to a reasoning template (qwen3); "
                f"the release's is {template.name}, which keeps every thought as written"
            )
        return requested
    return bool(_training_data(checkpoint).get("enable_thinking", True))


def _training_data(checkpoint: Path) -> dict:
    recorded = checkpoint / TRAINING_DATA_FILE
    return json.loads(recorded.read_text()) if recorded.is_file() else {}


@dataclass(frozen=True)
class ReleaseTokens:
    """The special tokens of a release, from its chat template and its tokenizer."""

    eos: str  # the template's stop token, which ends every assistant turn
    pad: str  # the tokenizer's own pad token, else its end-of-text token (as LLaMA-Factory pads)
    stops: tuple[str, ...]  # generation stops at any: the template's stops and the base model's end of text


def load_release_tokenizer(tokenizer_dir: Path, template: ChatTemplate, enable_thinking: bool = True):
    """(the tokenizer with `template` as its chat template and the template's stop token as EOS, the
    release's tokens); `enable_thinking`: a reasoning template's default."""
    tokenizer = load_tokenizer(tokenizer_dir)
    stop = template.stop_token
    if tokenizer.convert_tokens_to_ids(stop) in (None, tokenizer.unk_token_id):
        raise InputError(
            f"{tokenizer_dir}: the tokenizer has no {stop} token, with which the {template.name} chat "
            "template ends every assistant turn: export with the tokenizer and --chat-template the data was "
            "made with"
        )
    base_eos = tokenizer.eos_token
    known = set(tokenizer.get_vocab())
    tokens = ReleaseTokens(
        eos=stop,
        pad=tokenizer.pad_token or base_eos or stop,
        stops=tuple(dict.fromkeys(t for t in (*template.stop_tokens, base_eos) if t in known)),
    )
    tokenizer.chat_template = template.jinja(enable_thinking)
    tokenizer.eos_token = tokens.eos
    tokenizer.pad_token = tokens.pad
    return tokenizer, tokens


def write_release_configs(
    family: ModelFamily, hf_config: dict, out_dir: Path, dtype: torch.dtype, tokenizer, tokens: ReleaseTokens
) -> None:
    import transformers
    from transformers import GenerationConfig

    config = getattr(transformers, family.hf_config_class).from_dict(hf_config)
    config.architectures = [family.hf_model_class]
    config.dtype = dtype
    config.eos_token_id = tokenizer.convert_tokens_to_ids(tokens.eos)
    config.pad_token_id = tokenizer.convert_tokens_to_ids(tokens.pad)
    config.save_pretrained(out_dir)
    written = json.loads((out_dir / "config.json").read_text())
    write_json_atomic(out_dir / "config.json", with_transformers4_rope_keys(written))
    GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(list(tokens.stops)),
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out_dir)


def with_transformers4_rope_keys(config: dict) -> dict:
    """`config` with the rotary settings also where transformers 4 reads them: transformers 5 writes
    them only under `rope_parameters`, and transformers 4 (the pin of vLLM releases and of LLaMA-Factory
    0.9.3) reads the top-level `rope_theta` and `rope_scaling`, silently using a base of 10000 without
    them."""
    parameters = config.get("rope_parameters")
    if not isinstance(parameters, dict) or "rope_theta" not in parameters:
        return config
    out = {**config, "rope_theta": parameters["rope_theta"]}
    if parameters.get("rope_type", "default") != "default" and not config.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in parameters.items() if k != "rope_theta"}
    return out


def find_tokenizer(checkpoint: Path, tokenizer_dir: str | Path | None) -> Path:
    if tokenizer_dir is not None:
        return Path(tokenizer_dir)
    if (checkpoint / TOKENIZER_DIR).is_dir():
        return checkpoint / TOKENIZER_DIR
    raise InputError(
        f"{checkpoint} carries no tokenizer/ (its source had none): pass --tokenizer DIR, e.g. the "
        "base model's directory"
    )


def convert_mcore_to_hf(
    mcore_dir: str | Path,
    out_dir: str | Path,
    *,
    iteration: int | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    chat_template: str | None = None,
    enable_thinking: bool | None = None,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    max_piece_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
) -> ExportResult:
    """Exports the checkpoint at `mcore_dir` as a Hugging Face model directory `out_dir`.
    `dtype`: "bf16" or "fp32", or None to keep the checkpoint's dtype; `chat_template`: a template's name,
    or None for the one the training data was encoded with (`release_template`); `enable_thinking`: a
    reasoning template's default, or None for the training data's (`release_thinking`)."""
    from tqdm import tqdm

    started = time.perf_counter()
    checkpoint = resolve_checkpoint(mcore_dir, iteration)
    hf_config = read_hf_config(checkpoint)
    arch = arch_from_config(hf_config, str(checkpoint / HF_CONFIG_FILE))
    family = family_of(arch)
    reader = TorchDistReader(checkpoint)
    mappings = family.bound_mappings(arch, "te")
    source_dtype = check_checkpoint(arch, reader, mappings)
    target = DTYPES[dtype] if dtype else source_dtype
    tokenizer_path = find_tokenizer(checkpoint, tokenizer_dir)
    template = release_template(checkpoint, chat_template)
    thinking = release_thinking(checkpoint, template, enable_thinking)
    tokenizer, tokens = load_release_tokenizer(tokenizer_path, template, thinking)
    specs = [
        TensorSpec(key, shape, target)
        for m in mappings
        for key, shape in zip(m.hf_keys, m.hf_shapes, strict=True)
    ]
    total = sum(s.nbytes for s in specs)
    stored_chunk_bytes = {m.dist_key: _largest_stored_chunk_bytes(reader, m.dist_key) for m in mappings}
    owner = {key: m for m in mappings for key in m.hf_keys}
    log.info(
        "exporting %s (%d layers, %s) -> %s, %.2f GB %s",
        checkpoint,
        arch.num_layers,
        source_dtype,
        out_dir,
        total / 1e9,
        target,
    )
    with (
        atomic_directory(out_dir, force=force) as tmp,
        tqdm(total=total, unit="B", unit_scale=True, desc="mcore -> hf", disable=not progress) as bar,
    ):
        shards = write_sharded(
            tmp,
            specs,
            _hf_rows_reader(reader, mappings, target),
            max_shard_bytes=max_shard_bytes,
            piece_bytes=lambda spec: max(max_piece_bytes, stored_chunk_bytes[owner[spec.key].dist_key]),
            on_written=lambda spec, n: bar.update(n),
        )
        write_release_configs(family, hf_config, tmp, target, tokenizer, tokens)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(
            tmp / PROVENANCE_FILE,
            {
                **tool_info("convert_mcore_to_hf"),
                "checkpoint": str(checkpoint.resolve()),
                "tokenizer": str(tokenizer_path.resolve()),
                "chat_template": template.name,
                "enable_thinking": thinking,
                "source_dtype": str(source_dtype),
                "dtype": str(target),
                "arch": arch.to_dict(),
                "bytes": total,
            },
        )
    seconds = time.perf_counter() - started
    log.info(
        "wrote %s: %d shard(s), %.2f GB in %.1f s (%.2f GB/s)",
        out_dir,
        len(shards),
        total / 1e9,
        seconds,
        total / 1e9 / seconds,
    )
    return ExportResult(Path(out_dir), checkpoint, len(shards), total, seconds)
