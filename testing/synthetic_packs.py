"""Random packed datasets in the on-disk format of tools/preprocess_sft.py (formats/packed.py), for
tests and benchmarks.

    packs = random_packs(num_packs=16, seq_length=128, vocab_size=1000, seed=0)
    write_packed_dataset("/tmp/syn", packs, seq_length=128, vocab_size=1000)

Each pack is a list of (token ids, loss mask) conversations. The masks look like chat data: a prompt
part without loss, then a response part with loss, sometimes several turns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from formats.packed import INDEX_HEADER, PackedWriter, padded_lengths


def random_packs(
    num_packs: int,
    seq_length: int,
    vocab_size: int,
    seed: int = 0,
    max_conversations: int = 4,
    pad_multiple: int = 1,
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Packs of up to `max_conversations` random conversations (random loss spans) that fit `seq_length`
    once each is padded to a multiple of `pad_multiple`."""
    rng = np.random.default_rng(seed)
    packs = []
    units = seq_length // pad_multiple
    for _ in range(num_packs):
        budget = int(rng.integers(units // 2, units + 1))  # some packs full, some with padding
        count = int(rng.integers(1, max_conversations + 1))
        cuts = np.sort(rng.choice(np.arange(1, budget), size=min(count - 1, budget - 2), replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [budget]]))
        if pad_multiple > 1:  # from padded sizes to real lengths that round up to them
            lengths = lengths * pad_multiple - rng.integers(0, pad_multiple, size=len(lengths))
        pack = []
        for length in lengths:
            ids = rng.integers(0, vocab_size, size=length, dtype=np.int32)
            mask = np.zeros(length, dtype=np.uint8)
            for _turn in range(int(rng.integers(1, 3))):
                start = int(rng.integers(0, length))
                mask[start : int(rng.integers(start, length + 1))] = 1
            pack.append((ids, mask))
        packs.append(pack)
    return packs


def write_packed_dataset(
    prefix: str | Path,
    packs,
    seq_length: int,
    vocab_size: int,
    pad_multiple: int = 1,
    template: str = "synthetic",
) -> Path:
    """Writes PREFIX_input_ids/_loss_mask (.bin/.idx) and PREFIX_meta.json; returns the prefix.
    `template`: the chat template the meta names (random ids are encoded with none)."""
    with PackedWriter(prefix, seq_length, pad_multiple) as writer:
        for pack in packs:
            add_pack(
                writer,
                np.concatenate([ids for ids, _ in pack]),
                np.concatenate([mask for _, mask in pack]),
                [len(ids) for ids, _ in pack],
            )
        writer.commit(
            {
                "template": template,
                "tokenizer": {"vocab_size": vocab_size, "path": None},
                "stats": {
                    "conversations": sum(len(p) for p in packs),
                    "tokens": sum(len(ids) for pack in packs for ids, _ in pack),
                    "loss_tokens": int(sum(int(m.sum()) for pack in packs for _, m in pack)),
                },
            }
        )
    return Path(prefix)


def packs_from_lengths(
    conversation_lengths,
    capacity: int,
    vocab_size: int,
    seed: int = 0,
    prompt_fraction: float = 0.1,
    pad_multiple: int = 1,
):
    """Packs of conversations with the given lengths (cut to capacity), packed by the pipeline's own
    best-fit decreasing (of the lengths rounded up to `pad_multiple`, as tools/preprocess_sft.py does);
    each conversation is a prompt without loss followed by a trained response."""
    from preprocess.packing import best_fit_decreasing

    rng = np.random.default_rng(seed)
    lengths = np.minimum(np.asarray(conversation_lengths, dtype=np.int64), capacity)
    plan = best_fit_decreasing(padded_lengths(lengths, pad_multiple), capacity, seed=seed)
    packs = []
    for p in range(plan.num_packs):
        pack = []
        for c in plan.pack(p):
            length = int(lengths[c])
            mask = np.zeros(length, dtype=np.uint8)
            mask[max(1, int(prompt_fraction * length)) :] = 1
            pack.append((rng.integers(0, vocab_size, size=length, dtype=np.int32), mask))
        packs.append(pack)
    return packs


def add_pack(writer: PackedWriter, input_ids: np.ndarray, loss_mask: np.ndarray, lengths: list[int]) -> None:
    """One pack after those already in `writer`: the conversations' ids and mask, and their lengths."""
    if len(input_ids) != sum(lengths):
        raise ValueError(f"{len(input_ids)} token ids but the conversation lengths sum to {sum(lengths)}")
    (start,) = writer.reserve(lengths, [0, len(lengths)])
    writer.region_writer().write(int(start), input_ids, loss_mask)


def read_sequence_lengths(idx_path: str | Path) -> np.ndarray:
    """The sequence (= conversation) lengths of a megatron-core .idx, read without megatron-core (and
    so without torch): the tests' and benchmarks' own reader of the format."""
    with open(idx_path, "rb") as f:
        _magic, _version, _dtype, sequences, _documents = INDEX_HEADER.unpack(f.read(INDEX_HEADER.size))
        return np.fromfile(f, dtype=np.int32, count=sequences)
