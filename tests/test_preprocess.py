"""The preprocessing pipeline end to end on the aligned sample: what lands in the Megatron indexed
files (read back with megatron-core's IndexedDataset) against a straightforward reference (each
conversation encoded alone with the HF tokenizer), byte-identical output for any worker count,
the overlong and system-source options, metadata, and atomic outputs."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import InputError
from formats.chat_template import AM_THINKING
from formats.packed import PackedPaths, indexed_dataset_module
from preprocess.config import PreprocessConfig, histogram_path
from preprocess.pipeline import preprocess
from preprocess.sft_encoding import encode_pairs
from testing.template_text import as_messages

SEQ = 2048  # small, so the sample yields many packs and several truncations


def run(aligned, tokenizer_dir, prefix, **overrides):
    cfg = PreprocessConfig(
        input=aligned, tokenizer=tokenizer_dir, output_prefix=prefix, seq_length=SEQ, workers=1
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return preprocess(cfg, command=["test"])


@pytest.fixture(scope="module")
def packed(aligned_parquet, qwen_tokenizer_dir, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("packed") / "am"
    meta = run(aligned_parquet, qwen_tokenizer_dir, prefix)
    return prefix, meta


def read_packed(prefix):
    IndexedDataset = indexed_dataset_module().IndexedDataset
    return IndexedDataset(f"{prefix}_input_ids"), IndexedDataset(f"{prefix}_loss_mask")


def reference_conversations(aligned, tokenizer, cutoff, system_source="turn"):
    """(ids, mask) of each aligned row, encoded alone through transformers' tokenizer.encode."""

    def encode(messages):
        ids = [
            [t for piece in message for t in tokenizer.encode(piece, add_special_tokens=False)]
            for message in messages
        ]
        return list(zip(ids[::2], ids[1::2], strict=True))

    out = []
    for row in pq.read_table(aligned).to_pylist():
        turns = row["conversations"]
        system = turns[0]["value"] if turns[0]["from"] == "system" else None
        if turns[0]["from"] == "system":
            turns = turns[1:]
        if system_source == "column":
            system = row["system"]
        messages = AM_THINKING.render(system, None, as_messages([t["value"] for t in turns]))
        ids, mask, full = encode_pairs(encode(messages), cutoff)
        out.append((tuple(ids), tuple(mask), full))
    return out


def test_round_trip_through_megatron_indexed_dataset(packed, aligned_parquet, qwen_tokenizer):
    prefix, meta = packed
    ids_ds, mask_ds = read_packed(prefix)
    assert ids_ds.index.dtype == np.int32 and mask_ds.index.dtype == np.uint8
    # The two datasets agree in structure: same documents (packs), same sequences (conversations).
    assert np.array_equal(ids_ds.document_indices, mask_ds.document_indices)
    assert np.array_equal(ids_ds.sequence_lengths, mask_ds.sequence_lengths)
    docs = ids_ds.document_indices
    assert len(docs) - 1 == meta["stats"]["packs"]
    assert len(ids_ds) == meta["stats"]["conversations"] == 300
    pack_tokens = np.add.reduceat(ids_ds.sequence_lengths, docs[:-1])
    assert pack_tokens.max() <= SEQ and pack_tokens.sum() == meta["stats"]["tokens"]
    assert ids_ds.sequence_lengths.max() <= SEQ - 1  # the per-conversation cutoff

    got = Counter((tuple(ids_ds[i].tolist()), tuple(mask_ds[i].tolist())) for i in range(len(ids_ds)))
    reference = reference_conversations(aligned_parquet, qwen_tokenizer, SEQ - 1)
    assert got == Counter((ids, mask) for ids, mask, _ in reference)
    assert meta["stats"]["truncated"] == sum(full > SEQ - 1 for _, _, full in reference) > 0
    assert meta["stats"]["loss_tokens"] == sum(sum(mask) for _, mask, _ in reference)
    assert meta["stats"]["packing_efficiency"] == pytest.approx(
        pack_tokens.sum() / (len(pack_tokens) * SEQ), abs=1e-6
    )


def test_every_conversation_is_trained_and_starts_with_the_system_slot(packed, qwen_tokenizer):
    prefix, _ = packed
    ids_ds, mask_ds = read_packed(prefix)
    im_start = qwen_tokenizer.convert_tokens_to_ids("<|im_start|>")
    for i in range(len(ids_ds)):
        ids, mask = ids_ds[i], mask_ds[i]
        assert ids[0] == im_start and mask[0] == 0
        assert mask.sum() > 0


def test_metadata(packed, aligned_parquet, qwen_tokenizer_dir):
    prefix, meta = packed
    on_disk = json.loads(PackedPaths(str(prefix)).meta.read_text())
    assert on_disk == meta
    assert meta["seq_length"] == SEQ and meta["cutoff_len"] == SEQ - 1 and meta["template"] == "AM-thinking"
    assert meta["tokenizer"]["vocab_size"] == 151665 and len(meta["tokenizer"]["sha256"]) == 64
    assert meta["inputs"][0]["sha256"] and meta["command"] == ["test"]
    assert meta["stats"]["per_subset"]["multiturn"]["conversations"] == 50
    assert sum(c for _, _, c in meta["stats"]["length_histogram_log2"]) == 300
    assert histogram_path(prefix).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_is_byte_identical_for_any_worker_count(packed, aligned_parquet, qwen_tokenizer_dir, tmp_path):
    prefix, meta = packed
    other = tmp_path / "am4"
    meta4 = run(aligned_parquet, qwen_tokenizer_dir, other, workers=4)
    for ours, theirs in zip(
        PackedPaths(str(prefix)).data_files(), PackedPaths(str(other)).data_files(), strict=True
    ):
        assert ours.read_bytes() == theirs.read_bytes(), ours.name
    assert meta4["stats"] == meta["stats"]


def test_max_samples_reads_the_first_rows_only(aligned_parquet, qwen_tokenizer_dir, tmp_path):
    meta = run(aligned_parquet, qwen_tokenizer_dir, tmp_path / "first", max_samples=7)
    assert meta["stats"]["rows_read"] == 7 and meta["settings"]["max_samples"] == 7
    sliced = tmp_path / "first7.parquet"
    pq.write_table(pq.read_table(aligned_parquet).slice(0, 7), sliced)
    run(sliced, qwen_tokenizer_dir, tmp_path / "sliced")
    assert _conversations(tmp_path / "first") == _conversations(tmp_path / "sliced")
    with pytest.raises(InputError, match="--max-samples must be >= 1, got 0"):
        run(aligned_parquet, qwen_tokenizer_dir, tmp_path / "none", max_samples=0)


def test_overlong_drop_and_system_column(
    aligned_parquet, qwen_tokenizer_dir, qwen_tokenizer, tmp_path, packed
):
    _, truncate_meta = packed
    meta = run(aligned_parquet, qwen_tokenizer_dir, tmp_path / "drop", overlong="drop")
    assert meta["stats"]["dropped"] == {"overlong": truncate_meta["stats"]["truncated"]}
    assert meta["stats"]["conversations"] == 300 - truncate_meta["stats"]["truncated"]
    assert meta["stats"]["truncated"] == 0

    prefix = tmp_path / "column"
    run(aligned_parquet, qwen_tokenizer_dir, prefix, system_source="column")
    ids_ds, mask_ds = read_packed(prefix)
    got = Counter((tuple(ids_ds[i].tolist()), tuple(mask_ds[i].tolist())) for i in range(len(ids_ds)))
    reference = reference_conversations(aligned_parquet, qwen_tokenizer, SEQ - 1, system_source="column")
    assert got == Counter((ids, mask) for ids, mask, _ in reference)
    text = qwen_tokenizer.decode(ids_ds[0].tolist())
    assert text.startswith("<|im_start|>system\n")


def test_existing_outputs_need_force_and_failures_leave_nothing(
    aligned_parquet, qwen_tokenizer_dir, tmp_path, monkeypatch
):
    import preprocess.pipeline as pipeline

    prefix = tmp_path / "p"
    run(aligned_parquet, qwen_tokenizer_dir, prefix)
    with pytest.raises(InputError, match="--force"):
        run(aligned_parquet, qwen_tokenizer_dir, prefix)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(pipeline, "write_packs", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        run(aligned_parquet, qwen_tokenizer_dir, prefix, force=True)
    after = {p: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # the previous complete output is untouched, and no temporary file is left


def test_bad_inputs_are_named(qwen_tokenizer_dir, tmp_path):
    with pytest.raises(InputError, match="get_am_dataset"):
        run(tmp_path / "missing.parquet", qwen_tokenizer_dir, tmp_path / "x")

    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "plain.parquet")
    with pytest.raises(InputError, match="no `conversations` column"):
        run(tmp_path / "plain.parquet", qwen_tokenizer_dir, tmp_path / "x")
    with pytest.raises(InputError, match="tokenizer.json"):
        run(tmp_path / "plain.parquet", tmp_path, tmp_path / "x")
    # A tokenizer without the template's stop token (Llama 3's has no <|im_end|>) would train a model
    # that cannot end its turns with one token.
    other = shutil.copytree(qwen_tokenizer_dir, tmp_path / "other_tokenizer")
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|im_end|>"]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(InputError, match=r"no <\|im_end\|> token, with which the AM-thinking chat template"):
        run(tmp_path / "plain.parquet", other, tmp_path / "x")
    with pytest.raises(InputError, match=r"--seed must be in \[0, 2\*\*32\), got -1"):
        run(tmp_path / "plain.parquet", qwen_tokenizer_dir, tmp_path / "x", seed=-1)


def test_packs_fit_once_every_conversation_is_padded_for_context_parallelism(
    packed, aligned_parquet, tmp_path
):
    prefix, meta = packed  # the default --pad-multiple 64
    assert meta["pad_multiple"] == 64
    ids_ds, _ = read_packed(prefix)
    docs, lengths = ids_ds.document_indices, ids_ds.sequence_lengths.astype(np.int64)
    padded = -(-lengths // 64) * 64
    assert np.add.reduceat(padded, docs[:-1]).max() <= SEQ  # a CP layout's row is never wider than SEQ
    stats = meta["stats"]
    assert stats["max_pack_tokens_padded"] == np.add.reduceat(padded, docs[:-1]).max() <= SEQ
    assert stats["packing_efficiency_padded"] == pytest.approx(
        padded.sum() / (stats["packs"] * SEQ), abs=1e-6
    )
    assert stats["packing_efficiency"] < stats["packing_efficiency_padded"] <= 1
    with pytest.raises(InputError, match="--pad-multiple 96 must be >= 1 and divide --seq-length 2048"):
        run(aligned_parquet, meta["tokenizer"]["path"], tmp_path / "x", pad_multiple=96)


def _conversations(prefix) -> Counter:
    ids_ds, mask_ds = read_packed(prefix)
    return Counter((tuple(ids_ds[i].tolist()), tuple(mask_ds[i].tolist())) for i in range(len(ids_ds)))


@pytest.mark.slow  # a training run, a subprocess or a full pipeline: test-fast stays under 90 s
def test_held_out_split_is_decided_by_content(
    packed, aligned_parquet, qwen_tokenizer_dir, qwen_tokenizer, tmp_path
):
    from formats.packed import validation_prefix
    from preprocess.conversation import aligned_key, held_out

    rows = pq.read_table(aligned_parquet).to_pylist()
    encoded = reference_conversations(aligned_parquet, qwen_tokenizer, SEQ - 1)
    side = [held_out(aligned_key(row["conversations"]), 0.2, 1234) for row in rows]
    expected_valid = Counter((ids, mask) for (ids, mask, _), held in zip(encoded, side, strict=True) if held)
    assert 30 <= sum(expected_valid.values()) <= 90  # ~20% of 300

    prefix = tmp_path / "all" / "am"
    meta = run(aligned_parquet, qwen_tokenizer_dir, prefix, valid_fraction=0.2)
    valid_meta = json.loads(PackedPaths(validation_prefix(prefix)).meta.read_text())
    assert _conversations(validation_prefix(prefix)) == expected_valid
    assert _conversations(prefix) + expected_valid == _conversations(packed[0])  # nothing lost, nothing twice
    assert meta["split"] == {
        "valid_fraction": 0.2,
        "seed": 1234,
        "train_conversations": 300 - sum(expected_valid.values()),
        "valid_conversations": sum(expected_valid.values()),
        "valid_prefix": "am_valid",
        "role": "train",
    }
    assert valid_meta["split"]["role"] == "valid" and valid_meta["stats"]["conversations"] == len(
        list(expected_valid.elements())
    )
    assert (
        valid_meta["stats"]["loss_tokens"] + meta["stats"]["loss_tokens"] == packed[1]["stats"]["loss_tokens"]
    )

    # The same conversations in another order, with a third of the dataset gone: each keeps its side.
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))[:200]]
    smaller = tmp_path / "smaller.parquet"
    pq.write_table(pa.Table.from_pylist(shuffled, schema=pq.read_schema(aligned_parquet)), smaller)
    kept = {id(row) for row in shuffled}
    expected_smaller = Counter(
        (ids, mask)
        for row, (ids, mask, _), held in zip(rows, encoded, side, strict=True)
        if held and id(row) in kept
    )
    run(smaller, qwen_tokenizer_dir, tmp_path / "smaller" / "am", valid_fraction=0.2)
    assert _conversations(validation_prefix(tmp_path / "smaller" / "am")) == expected_smaller

    # Re-run without a split (--force): the stale held-out set goes, so no trainer picks it up.
    run(aligned_parquet, qwen_tokenizer_dir, prefix, force=True)
    assert not any(p.exists() for p in PackedPaths(validation_prefix(prefix)).all_files())


@pytest.mark.parametrize(("workers", "gather_tokens"), [(1, 1 << 22), (1, 5), (3, 7)])
def test_write_packs_puts_each_conversation_at_its_place(tmp_path, workers, gather_tokens):
    # A tiny gather buffer (5 or 7 tokens, grown to the longest conversation's 19) splits each run of
    # packs into many chunks; the packs must still be the spilled conversations, in plan order.
    from formats.packed import PackedDataset, PackedWriter
    from preprocess.packing import best_fit_decreasing
    from preprocess.write import write_packs

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 20, size=100).astype(np.int32)
    ids = rng.integers(0, 1000, int(lengths.sum())).astype(np.int32)
    mask = rng.integers(0, 2, int(lengths.sum())).astype(np.uint8)
    spill = tmp_path / "spill_ids", tmp_path / "spill_mask"
    ids.tofile(spill[0])
    mask.tofile(spill[1])
    members = np.flatnonzero(rng.random(len(lengths)) < 0.7)  # one split's conversations
    plan = best_fit_decreasing(lengths[members], 48, seed=1).shuffled(1)
    with PackedWriter(tmp_path / "out", 48) as writer:
        write_packs(plan, members, lengths, *spill, writer, workers, gather_tokens=gather_tokens)
        writer.commit({"tokenizer": {"vocab_size": 1000}, "stats": {}})
    dataset = PackedDataset(tmp_path / "out")
    assert len(dataset) == plan.num_packs > 10
    begins = np.cumsum(lengths) - lengths
    for p in range(plan.num_packs):
        convs = members[plan.pack(p)]
        pack = dataset[p]
        np.testing.assert_array_equal(pack.lengths, lengths[convs])
        np.testing.assert_array_equal(
            pack.input_ids, np.concatenate([ids[begins[c] :][: lengths[c]] for c in convs])
        )
        np.testing.assert_array_equal(
            pack.loss_mask, np.concatenate([mask[begins[c] :][: lengths[c]] for c in convs])
        )


def test_the_command_line_takes_its_defaults_from_the_config():
    """tools/preprocess_sft.py writes no default of its own: every flag left out is PreprocessConfig's."""
    from tools_runner import load_tool

    parsed = load_tool("preprocess_sft").parse_args(
        ["--input", "a", "--tokenizer", "t", "--output-prefix", "o"]
    )
    assert parsed == PreprocessConfig(input=Path("a"), tokenizer=Path("t"), output_prefix=Path("o"))
    chosen = load_tool("preprocess_sft").parse_args(
        [
            "--input",
            "a",
            "--tokenizer",
            "t",
            "--output-prefix",
            "o",
            "--seq-length",
            "4096",
            "--overlong",
            "drop",
        ]
    )
    assert (chosen.seq_length, chosen.overlong, chosen.pad_multiple) == (4096, "drop", 64)


def test_every_setting_is_a_flag_documented_where_the_field_is(capsys):
    """One convention with the trainer's keys: a PreprocessConfig field's comment is its flag's help (a
    new field without one fails here), and every field is a flag."""
    import dataclasses

    from common.config_docs import field_docs

    from tools_runner import load_tool

    docs = field_docs(PreprocessConfig)
    fields = [f.name for f in dataclasses.fields(PreprocessConfig)]
    assert [name for name in fields if not docs.get(name)] == []
    with pytest.raises(SystemExit):
        load_tool("preprocess_sft").main(["--help"])
    flowing = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
    for name in fields:
        assert f"--{name.replace('_', '-')}" in flowing, name
        assert " ".join(docs[name].split()) in flowing, name
    assert "its stop token must be in the tokenizer (default AM-thinking)" in flowing


def test_a_tokenizer_that_adds_a_bos_token_changes_no_token(
    packed, aligned_parquet, llama3_tokenizer_dir, tmp_path
):
    """Llama 3's tokenizer puts <|begin_of_text|> first when asked for special tokens; the template's
    pieces are encoded without them, as LLaMA-Factory encodes them, so a bos is in the data only where
    a template puts it. The Llama-3-style test tokenizer keeps Qwen2.5's ids: the packed files are the
    Qwen2.5 tokenizer's, byte for byte."""
    from formats.tokenizer import load_backend_tokenizer

    assert load_backend_tokenizer(llama3_tokenizer_dir).encode("hi").ids[0] == 151665  # bos when asked
    prefix, _ = packed
    run(aligned_parquet, llama3_tokenizer_dir, tmp_path / "am")
    for name in ("input_ids", "loss_mask"):
        for suffix in (".bin", ".idx"):
            ours = Path(f"{tmp_path / 'am'}_{name}{suffix}").read_bytes()
            assert ours == Path(f"{prefix}_{name}{suffix}").read_bytes(), name + suffix
