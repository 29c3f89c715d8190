"""What a packed dataset's PREFIX_meta.json says about it, and the summary printed from it.

The meta records how the dataset was made (settings, template, tokenizer and input fingerprints, the
command line), the held-out split, and its statistics: rows read and dropped by reason, truncation,
tokens, packing efficiency, lengths, and counts per subset.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from common.files import file_fingerprint
from formats.chat_template import ChatTemplate
from formats.packed import padded_lengths
from formats.tokenizer import tokenizer_fingerprint

from . import conversation
from .config import PreprocessConfig
from .packing import PackPlan
from .spill import EncodedConversations
from .stats import format_histogram, length_summary, log2_histogram


def provenance(
    cfg: PreprocessConfig,
    template: ChatTemplate,
    vocab_size: int,
    inputs: list[Path],
    datasets: list[dict[str, Any]],
    command: list[str] | None,
) -> dict[str, Any]:
    """How the run's datasets were made: the part of the meta that they share."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "force"}
    return {
        "template": template.name,
        "datasets": datasets,
        "cutoff_len": cfg.cutoff_len,
        "settings": settings,
        "tokenizer": {
            "path": str(cfg.tokenizer),
            "sha256": tokenizer_fingerprint(cfg.tokenizer),
            "vocab_size": vocab_size,
            "stop_token": template.stop_token,
        },
        "inputs": [file_fingerprint(path) for path in inputs],
        "command": command,
    }


def dataset_meta(
    made: dict[str, Any],
    encoded: EncodedConversations,
    members: np.ndarray,
    plan: PackPlan,
    cfg: PreprocessConfig,
    split: dict[str, Any],
) -> dict[str, Any]:
    """The meta of the dataset of conversations `members`; rows read and dropped are the input's."""
    lengths, full_lengths = encoded.lengths[members], encoded.full_lengths[members]
    total_tokens = int(lengths.sum(dtype=np.int64))
    dropped = {r: encoded.dropped[r] for r in conversation.DROP_REASONS if encoded.dropped[r]}
    pack_tokens = plan.pack_tokens(lengths)
    padded_tokens = plan.pack_tokens(padded_lengths(lengths, cfg.pad_multiple))
    capacity = plan.num_packs * cfg.seq_length
    stats = {
        "rows_read": encoded.rows,
        "conversations": int(len(lengths)),
        "dropped": dropped,
        "truncated": int((full_lengths > lengths).sum()),
        "tokens": total_tokens,
        "loss_tokens": int(encoded.loss_tokens[members].sum()),
        "tokens_lost_to_truncation": int((full_lengths - lengths).sum()),
        "packs": plan.num_packs,
        "packing_efficiency": round(total_tokens / capacity, 6),
        "packing_efficiency_padded": round(int(padded_tokens.sum()) / capacity, 6),
        "conversations_per_pack": round(len(lengths) / plan.num_packs, 3),
        "max_pack_tokens": int(pack_tokens.max()),
        "max_pack_tokens_padded": int(padded_tokens.max()),
        "lengths": length_summary(lengths),
        "length_histogram_log2": [list(row) for row in log2_histogram(lengths, cfg.seq_length)],
        "per_subset": _named_subsets(encoded.per_subset[split["role"]]),
        "per_dataset": per_dataset_stats(made["datasets"], encoded, members),
    }
    return {**made, "split": split, "stats": stats}


def _named_subsets(per_subset: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Counts per subset, where the rows name one (the aligned AM-Thinking parquet); registry datasets have
    none (their counts are per dataset)."""
    return {} if set(per_subset) <= {""} else per_subset


def per_dataset_stats(
    datasets: list[dict[str, Any]], encoded: EncodedConversations, members: np.ndarray
) -> dict[str, dict[str, Any]]:
    """Per dataset of the run: rows read, dropped and held out (input-wide), and its conversations in this
    dataset."""
    index = encoded.dataset[members]
    lengths, full_lengths = encoded.lengths[members], encoded.full_lengths[members]
    stats = {}
    for d, dataset in enumerate(datasets):
        mine = index == d
        dropped = encoded.dropped_per_dataset[d]
        stats[dataset["name"]] = {
            "rows_read": encoded.rows_per_dataset[d],
            "dropped": {r: dropped[r] for r in conversation.DROP_REASONS if dropped[r]},
            "held_out": int((encoded.held_out & (encoded.dataset == d)).sum()),
            "conversations": int(mine.sum()),
            "truncated": int((full_lengths[mine] > lengths[mine]).sum()),
            "tokens": int(lengths[mine].sum(dtype=np.int64)),
            "loss_tokens": int(encoded.loss_tokens[members][mine].sum()),
        }
    return stats


def report(meta: dict[str, Any]) -> str:
    """A human-readable summary of PREFIX_meta.json."""
    stats = meta["stats"]
    lines = [
        f"conversations   {stats['conversations']:>12,} of {stats['rows_read']:,} rows  (truncated "
        f"{stats['truncated']:,}, "
        f"{stats['tokens_lost_to_truncation']:,} tokens cut)",
        f"dropped         {sum(stats['dropped'].values()):>12,}  {stats['dropped'] or ''}",
        f"tokens          {stats['tokens']:>12,}  (loss tokens {stats['loss_tokens']:,}, "
        f"{stats['loss_tokens'] / stats['tokens']:.1%})",
        f"packs           {stats['packs']:>12,}  x {meta['seq_length']} tokens, efficiency "
        f"{stats['packing_efficiency']:.4%} ({stats['packing_efficiency_padded']:.4%} with conversations "
        "padded to "
        f"multiples of {meta['pad_multiple']}), {stats['conversations_per_pack']} conversations/pack",
        "length          "
        + "  ".join(f"{k}={v}" for k, v in stats["lengths"]["percentiles"].items())
        + f"  max={stats['lengths']['max']}",
    ]
    split = meta.get("split") or {}
    if split.get("valid_conversations"):
        lines.append(
            f"held out        {split['valid_conversations']:>12,}  conversations (--valid-fraction "
            f"{split['valid_fraction']}, seed {split['seed']}) in {split['valid_prefix']}"
        )
    if len(stats.get("per_dataset", {})) > 1:
        for name, counts in stats["per_dataset"].items():
            dropped = counts["dropped"]
            held_out = f" (+{counts['held_out']:,} held out)" if counts["held_out"] else ""
            lines.append(
                f"  dataset {name:<13} {counts['conversations']:>10,} conversations{held_out} of "
                f"{counts['rows_read']:,} rows {counts['tokens']:>14,} tokens  (truncated "
                f"{counts['truncated']:,}; dropped {sum(dropped.values()):,} {dropped or ''})"
            )
    for subset, counts in stats["per_subset"].items():
        lines.append(
            f"  subset {subset or '(none)':<14} {counts['conversations']:>10,} conversations "
            f"{counts['tokens']:>14,} tokens"
        )
    lines.append("tokens per conversation:\n" + format_histogram(stats["length_histogram_log2"]))
    return "\n".join(lines)
