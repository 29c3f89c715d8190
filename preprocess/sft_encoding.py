"""LLaMA-Factory 0.9.3's supervised encoding of one conversation: pairs -> token ids and loss mask.

A conversation is a list of (source, target) pairs of token ids (`ChatTemplate.render`, tokenised:
source = a user or observation message, with the system text before the first; target = the
assistant or function-call message that answers it). As `SupervisedDatasetProcessor._encode_data_example`
does:

* truncation (`infer_seqlen`) is per pair with the remaining budget, keeping the head of each part;
  later pairs are dropped once the budget is spent;
* targets are trained and sources masked, unless `train_on_prompt` (everything trained) or
  `mask_history` (only the last pair's target trained; the budget is spent from the last pair
  backwards, so truncation drops the earliest pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import InputError

Pair = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class LossOptions:
    """Which tokens are trained, as LLaMA-Factory's `train_on_prompt` and `mask_history` say."""

    train_on_prompt: bool = False
    mask_history: bool = False

    def validate(self) -> None:
        if self.train_on_prompt and self.mask_history:  # LLaMA-Factory refuses them together too
            raise InputError("--mask-history and --train-on-prompt cannot be used together")


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LLaMA-Factory's budget split for one (source, target) pair; returns the kept lengths.

    The float expression in the last branch is deliberate: it is LLaMA-Factory's, and an integer
    formula would round differently in rare cases.
    """
    if target_len * 2 < cutoff_len:  # short target: it may use the whole budget
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:  # short source: the target gets the rest
        max_target_len = cutoff_len - source_len
    else:  # both long: split the budget in proportion
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    new_source_len = min(max(cutoff_len - new_target_len, 0), source_len)
    return new_source_len, new_target_len


def encode_pairs(
    pairs: Sequence[Pair], cutoff_len: int, loss: LossOptions = LossOptions()
) -> tuple[list[int], list[int], int]:
    """(ids, mask, full_length) of a conversation's pairs; full_length is the untruncated token count."""
    full_length = sum(len(source) + len(target) for source, target in pairs)
    order = list(reversed(pairs)) if loss.mask_history else list(pairs)
    kept: list[tuple[list[int], list[int]]] = []  # (ids, mask) per kept pair, in `order`
    total = 0
    for turn, (source, target) in enumerate(order):
        if total >= cutoff_len:
            break
        source_len, target_len = infer_seqlen(len(source), len(target), cutoff_len - total)
        total += source_len + target_len
        trained_target = not (loss.mask_history and turn != 0)
        kept.append(
            (
                [*source[:source_len], *target[:target_len]],
                [int(loss.train_on_prompt)] * source_len + [int(trained_target)] * target_len,
            )
        )
    if loss.mask_history:
        kept.reverse()
    ids = [token for pair_ids, _ in kept for token in pair_ids]
    mask = [bit for _, pair_mask in kept for bit in pair_mask]
    return ids, mask, full_length
