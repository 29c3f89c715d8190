"""The trainer's data path: packs -> THD micro-batches (hand-computed expectations), the epoch order,
the data-parallel split, and packed attention against a dense block-diagonal reference."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.distributed import run_distributed
from common.errors import DataError
from formats.packed import Pack, PackedDataset
from plan.layout import ParallelLayout
from sft.data import PackOrder, SFTData, make_micro_batch
from testing.synthetic_packs import random_packs, write_packed_dataset


def _pack(*conversations):
    ids = [np.array(c[0], dtype=np.int32) for c in conversations]
    masks = [np.array(c[1], dtype=np.uint8) for c in conversations]
    return Pack(np.concatenate(ids), np.concatenate(masks), np.array([len(i) for i in ids], dtype=np.int32))


def test_micro_batch_labels_positions_and_padding_by_hand():
    # Two conversations (3 and 4 tokens) in one pack of 9: two padding tokens close the row.
    pack = _pack(([11, 12, 13], [0, 1, 1]), ([21, 22, 23, 24], [0, 0, 1, 1]))
    batch = make_micro_batch([pack], seq_length=9, pad_token_id=7)
    assert batch.tokens.tolist() == [[11, 12, 13, 21, 22, 23, 24, 7, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0, 1]]
    assert batch.cu_seqlens.tolist() == [0, 3, 7, 9] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 4 and batch.real_tokens == 7
    # Position t predicts t+1 in the same conversation; trained when token t+1 is a target.
    assert batch.labels.tolist() == [[12, 13, 0, 22, 23, 24, 0, 7, 0]]
    assert batch.loss_mask.tolist() == [[1, 1, 0, 0, 1, 1, 0, 0, 0]]


def test_micro_batch_of_two_full_packs_has_no_padding_segment():
    a = _pack(([1, 2, 3, 4], [1, 1, 1, 1]))
    b = _pack(([5, 6], [0, 1]), ([8, 9], [1, 1]))
    batch = make_micro_batch([a, b], seq_length=4)
    assert batch.cu_seqlens.tolist() == [0, 4, 6, 8]
    assert batch.labels.tolist() == [[2, 3, 4, 0, 6, 0, 9, 0]]
    assert batch.loss_mask.tolist() == [[1, 1, 1, 0, 1, 0, 1, 0]]


def test_overfull_pack_is_refused():
    with pytest.raises(DataError, match="more than"):
        make_micro_batch([_pack(([1, 2, 3], [1, 1, 1]))], seq_length=2)


def test_each_epoch_visits_every_pack_once_in_a_seeded_order():
    order = PackOrder([7, 5], weights=None, seed=3)
    epochs = [order.slots(e * 12, 12) for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted([(0, i) for i in range(7)] + [(1, i) for i in range(5)])
    assert epochs[0] != epochs[1] != epochs[2]
    assert (
        PackOrder([7, 5], None, seed=3).slots(5, 10) == (epochs[0] + epochs[1])[5:15]
    )  # deterministic, any start
    assert PackOrder([7, 5], None, seed=4).slots(0, 12) != epochs[0]


def test_weights_over_and_under_sample_evenly():
    order = PackOrder([10, 10], weights=[3.0, 1.0], seed=0)
    assert order.per_epoch == [15, 5]
    first_two = order.slots(0, 40)
    counts = np.bincount([pack for prefix, pack in first_two if prefix == 0], minlength=10)
    assert counts.tolist() == [3] * 10  # 30 draws of prefix 0 over two epochs: every pack three times
    drawn = [pack for prefix, pack in first_two if prefix == 1]
    assert sorted(drawn) == list(range(10))  # 10 draws of prefix 1: each pack once, none twice


def test_data_parallel_ranks_split_the_global_batch(tmp_path):
    prefix = write_packed_dataset(tmp_path / "d", random_packs(10, 32, 1000, seed=1), 32, 1000)
    data = SFTData([str(prefix)], None, seed=5)
    whole = data.micro_batches(
        4, global_batch_size=4, layout=ParallelLayout(), data_parallel_rank=0, data_parallel_size=1
    )
    split = [mb for rank in range(2) for mb in data.micro_batches(4, 4, ParallelLayout(), rank, 2)]
    assert all(
        torch.equal(a.tokens, b.tokens) and torch.equal(a.loss_mask, b.loss_mask)
        for a, b in zip(whole, split, strict=True)
    )
    assert data.iterations(epochs=2, global_batch_size=4) == 5  # 20 slots, the last 0 packs unused
    lengths = data.conversation_lengths(4, 4)
    assert lengths.sum() == sum(mb.real_tokens for mb in whole)


def test_dataset_reads_packs_back_and_rejects_mismatched_files(tmp_path):
    packs = random_packs(5, 48, 500, seed=2)
    prefix = write_packed_dataset(tmp_path / "d", packs, 48, 500)
    dataset = PackedDataset(prefix)
    assert len(dataset) == 5 and dataset.seq_length == 48
    for i, pack in enumerate(packs):
        assert np.array_equal(dataset[i].input_ids, np.concatenate([ids for ids, _ in pack]))
        assert np.array_equal(dataset[i].loss_mask, np.concatenate([mask for _, mask in pack]))
        assert dataset[i].lengths.tolist() == [len(ids) for ids, _ in pack]
    assert dataset.longest_padded_pack(1) == max(sum(len(ids) for ids, _ in pack) for pack in packs)
    assert dataset.longest_padded_pack(8) == max(
        sum(-(-len(ids) // 8) * 8 for ids, _ in pack) for pack in packs
    )
    write_packed_dataset(tmp_path / "other", random_packs(5, 48, 500, seed=9), 48, 500)
    for suffix in (".bin", ".idx"):
        (tmp_path / f"d_loss_mask{suffix}").write_bytes((tmp_path / f"other_loss_mask{suffix}").read_bytes())
    with pytest.raises(DataError, match="different preprocessing runs"):
        PackedDataset(prefix)
    with pytest.raises(DataError, match="preprocess_sft.py"):
        PackedDataset(tmp_path / "missing")


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _overwrite(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(value)


def _edit_meta(prefix, edit):
    meta = json.loads(Path(f"{prefix}_meta.json").read_text())
    edit(meta)
    Path(f"{prefix}_meta.json").write_text(json.dumps(meta))


DAMAGE = {  # what happened to the files -> what the error must say
    "truncated ids": (
        lambda p: _truncate(f"{p}_input_ids.bin", Path(f"{p}_input_ids.bin").stat().st_size - 100),
        r"d_input_ids\.bin holds [\d,]+ bytes, its \.idx describes [\d,]+ \(truncated\)",
    ),
    "extra mask bytes": (
        lambda p: Path(f"{p}_loss_mask.bin").write_bytes(Path(f"{p}_loss_mask.bin").read_bytes() + b"\0"),
        r"d_loss_mask\.bin holds .* \(extra bytes at the end\)",
    ),
    "missing index": (lambda p: Path(f"{p}_loss_mask.idx").unlink(), r"d_loss_mask\.idx not found"),
    "damaged index": (
        lambda p: _truncate(f"{p}_input_ids.idx", 50),
        r"d_input_ids\.idx cannot be read \(50 bytes where its header describes [\d,]+\)",
    ),
    "id outside the vocabulary": (
        lambda p: _overwrite(f"{p}_input_ids.bin", 8, np.int32(500).tobytes()),
        r"d_input_ids\.bin: pack 0 holds token id 500, outside the tokenizer's vocabulary of 500",
    ),
    "mask value 7": (
        lambda p: _overwrite(f"{p}_loss_mask.bin", 3, b"\x07"),
        r"d_loss_mask\.bin: pack 0 holds the mask value 7",
    ),
    "meta of another run": (
        lambda p: _edit_meta(p, lambda m: m["stats"].update(tokens=m["stats"]["tokens"] + 1)),
        r"d_meta\.json says 5 of [\d,]+: the meta file belongs to another preprocessing run",
    ),
    "meta not JSON": (lambda p: Path(f"{p}_meta.json").write_text("{"), r"d_meta\.json cannot be read"),
}


def test_writer_files_equal_megatron_cores_builder_byte_for_byte(tmp_path):
    from formats.packed import PackedWriter, indexed_dataset_module
    from testing.synthetic_packs import add_pack, read_sequence_lengths

    packs = random_packs(7, 48, 500, seed=5)
    builder = indexed_dataset_module().IndexedDatasetBuilder
    for stem, dtype, k in (("ref_input_ids", np.int32, 0), ("ref_loss_mask", np.uint8, 1)):
        reference = builder(str(tmp_path / f"{stem}.bin"), dtype=dtype)
        for pack in packs:
            reference.add_document(np.concatenate([c[k] for c in pack]), [len(c[0]) for c in pack])
        reference.finalize(str(tmp_path / f"{stem}.idx"))
    # Ours: two packs added one by one, the rest reserved at once and written in reverse order.
    with PackedWriter(tmp_path / "ours", 48) as writer:
        for pack in packs[:2]:
            add_pack(
                writer, *(np.concatenate([c[k] for c in pack]) for k in (0, 1)), [len(c[0]) for c in pack]
            )
        lengths = [[len(c[0]) for c in pack] for pack in packs[2:]]
        starts = writer.reserve(np.concatenate(lengths), np.cumsum([0] + [len(x) for x in lengths]))
        regions = writer.region_writer()
        for start, pack in reversed(list(zip(starts, packs[2:], strict=True))):
            regions.write(int(start), *(np.concatenate([c[k] for c in pack]) for k in (0, 1)))
        writer.commit({"tokenizer": {"vocab_size": 500}, "stats": {}})
    for stem in ("input_ids", "loss_mask"):
        for suffix in (".bin", ".idx"):
            ours, ref = tmp_path / f"ours_{stem}{suffix}", tmp_path / f"ref_{stem}{suffix}"
            assert ours.read_bytes() == ref.read_bytes(), ours.name
    expected = [len(c[0]) for pack in packs for c in pack]
    assert read_sequence_lengths(tmp_path / "ours_loss_mask.idx").tolist() == expected


@pytest.mark.parametrize(
    ("lengths", "offsets", "bad"),
    [([20, 20, 9], [0, 2, 3], 0), ([5, 0, 5], [0, 1, 3], 1), ([5, 5], [0, 1, 1, 2], 1)],
    ids=["too-long", "empty-conversation", "empty-pack"],
)
def test_reserve_names_the_pack_that_cannot_be_written(tmp_path, lengths, offsets, bad):
    from formats.packed import PackedWriter
    from testing.synthetic_packs import add_pack

    with PackedWriter(tmp_path / "x", 32, pad_multiple=8) as writer:
        add_pack(writer, np.zeros(3, np.int32), np.zeros(3, np.uint8), [3])  # pack numbers continue after it
        with pytest.raises(DataError, match=f"^{tmp_path / 'x'}: pack {1 + bad}: conversation lengths "):
            writer.reserve(lengths, offsets)
        assert writer.packs == 1


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_files_are_named_with_the_fix(tmp_path, damage):
    prefix = write_packed_dataset(tmp_path / "d", random_packs(5, 48, 500, seed=2), 48, 500)
    PackedDataset(prefix)  # intact
    harm, message = DAMAGE[damage]
    harm(prefix)
    with pytest.raises(DataError, match=message) as error:
        PackedDataset(prefix)
    assert f"tools/preprocess_sft.py --output-prefix {prefix}" in str(error.value)


def test_a_pack_outlives_its_dataset(tmp_path):
    # megatron-core's IndexedDataset unmaps its files when collected: a pack holding views into them
    # would crash the process (a segfault) on first touch afterwards, so packs own their arrays.
    packs = random_packs(3, 64, 500, seed=4)
    dataset = PackedDataset(write_packed_dataset(tmp_path / "d", packs, 64, 500))
    pack = dataset[2]
    assert all(a.flags.owndata for a in (pack.input_ids, pack.loss_mask, pack.lengths))
    del dataset
    gc.collect()
    assert np.array_equal(pack.input_ids, np.concatenate([ids for ids, _ in packs[2]]))
    assert pack.lengths.tolist() == [len(ids) for ids, _ in packs[2]]


def test_packed_attention_equals_block_diagonal_causal_reference():
    from models.packed_attention import packed_causal_attention

    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    total, heads, groups, dim = sum(lengths), 4, 2, 8
    q = torch.randn(total, heads, dim, dtype=torch.float64)
    k, v = (
        torch.randn(total, groups, dim, dtype=torch.float64),
        torch.randn(total, groups, dim, dtype=torch.float64),
    )
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    out = packed_causal_attention(q, k, v, cu, max(lengths), scale=dim**-0.5)
    # Dense reference: one softmax over the whole pack with a block-diagonal causal mask.
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    kk, vv = k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)
    scores = torch.einsum("thd,shd->hts", q, kk) * dim**-0.5
    reference = torch.einsum("hts,shd->thd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
    assert torch.allclose(out, reference, atol=1e-12)


def test_context_parallel_padding_and_split_by_hand():
    from sft.data import context_parallel_indices, split_for_context_parallel

    # CP=2 pads each conversation to a multiple of 2 x CP = 4, inside its own segment: 3 -> 4, 6 -> 8;
    # a 16-token row leaves a 4-token padding segment at the end.
    pack = _pack(([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7, 8, 9], [0, 0, 1, 1, 1, 1]))
    batch = make_micro_batch([pack], seq_length=16, pad_token_id=0, pad_multiple=4)
    assert batch.tokens.tolist() == [[1, 2, 3, 0, 4, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0]]
    # the segments are the padded conversations: cu_seqlens == cu_seqlens_padded (no pad-between mode in TE)
    assert batch.cu_seqlens.tolist() == batch.cu_seqlens_padded.tolist() == [0, 4, 12, 16]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    assert batch.labels.tolist() == [[2, 3, 0, 0, 5, 6, 7, 8, 9, 0, 0, 0, 0, 0, 0, 0]]
    assert batch.loss_mask.tolist() == [[1, 1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    assert batch.max_seqlen == 8
    # Each padded segment in 4 chunks; rank r takes chunks r and 3 - r.
    offsets = batch.cu_seqlens_padded.numpy()
    assert context_parallel_indices(offsets, 2, 0).tolist() == [0, 3, 4, 5, 10, 11, 12, 15]
    assert context_parallel_indices(offsets, 2, 1).tolist() == [1, 2, 6, 7, 8, 9, 13, 14]
    halves = [split_for_context_parallel(batch, 2, rank) for rank in range(2)]
    assert halves[0].tokens.tolist() == [[1, 0, 4, 5, 0, 0, 0, 0]]
    assert halves[1].labels.tolist() == [[3, 0, 7, 8, 9, 0, 0, 0]]
    assert sum(float(h.loss_mask.sum()) for h in halves) == float(batch.loss_mask.sum())
    assert all(
        torch.equal(h.cu_seqlens_padded, batch.cu_seqlens_padded) for h in halves
    )  # offsets stay global


def test_layout_drives_padding_and_the_context_parallel_split(tmp_path):
    """The run's ParallelLayout decides the padding (2 x CP per conversation) and which tokens each
    context-parallel rank holds: the rows are exactly micro_batch_size x seq_length wide, the two ranks'
    shares are the whole padded row; data packed for a smaller padding multiple is refused."""
    from testing.synthetic_packs import packs_from_lengths

    lengths = np.random.default_rng(3).integers(5, 30, size=40)
    packs = packs_from_lengths(lengths, 40, 1000, seed=3, pad_multiple=8)  # fits 40 once padded to 8
    prefix = write_packed_dataset(tmp_path / "d", packs, 40, 1000, pad_multiple=8)
    data = SFTData([str(prefix)], None, seed=2)
    layout = ParallelLayout(context=2, micro_batch_size=2)
    assert (
        layout.pad_multiple == 4
        and ParallelLayout(context=2, tensor=2, sequence_parallel=True).pad_multiple == 8
    )
    assert data.layout_problems(layout) == [] and data.row_width(layout) == 80
    assert data.layout_problems(ParallelLayout(context=4, tensor=2, sequence_parallel=True))  # needs 16
    packs = [data.datasets[0][pack] for _, pack in data.order.slots(0, 4)]
    whole = [make_micro_batch(packs[i : i + 2], 40, pad_multiple=4, width=80) for i in (0, 2)]
    shares = [data.micro_batches(0, 4, layout, 0, 1, context_parallel_rank=r) for r in range(2)]
    for i, row in enumerate(whole):
        assert torch.equal(row.cu_seqlens, row.cu_seqlens_padded)  # padding inside each segment
        halves = [shares[r][i] for r in range(2)]
        assert all(h.tokens.shape[1] == 40 for h in halves)
        assert sorted(torch.cat([h.tokens for h in halves], 1)[0].tolist()) == sorted(row.tokens[0].tolist())
        assert sum(float(h.loss_mask.sum()) for h in halves) == float(row.loss_mask.sum())
    unpadded = write_packed_dataset(tmp_path / "u", random_packs(4, 40, 1000, seed=1), 40, 1000)
    problems = SFTData([str(unpadded)], None, seed=2).layout_problems(layout)
    assert len(problems) == 1 and "--pad-multiple 1" in problems[0] and "a multiple of 4" in problems[0]


def test_the_loss_ignores_whatever_masked_positions_hold():
    from sft.train_module import loss_func

    losses = torch.tensor([[2.0, float("nan"), 4.0, float("inf")]], requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    total, count, logged = loss_func(mask, losses)
    assert total.item() == 6.0 and count.item() == 2 and logged.tolist() == [6.0, 2.0]
    total.backward()
    assert losses.grad.tolist() == [[1.0, 0.0, 1.0, 0.0]]  # no NaN flows back through the mask either


def test_per_group_loss_weights_by_hand_at_every_layout(tmp_path):
    """The recipe's weighting: groups of 2 consecutive packs of the global batch, each group's per-token
    mean, averaged over groups; the same masks whatever the data-parallel split or micro-batch size."""
    packs = [
        [(np.arange(1, 5), np.array([0, 1, 1, 1], np.uint8))],  # 3 targets
        [
            (np.arange(5, 7), np.array([0, 1], np.uint8)),
            (np.arange(7, 10), np.array([1, 1, 1], np.uint8)),
        ],  # 1 + 2
        [(np.arange(10, 18), np.array([0, 0, 0, 1, 1, 1, 1, 1], np.uint8))],  # 5
        [(np.arange(18, 20), np.array([0, 1], np.uint8))],  # 1
    ]
    targets = {0: 3, 1: 3, 2: 5, 3: 1}
    data = SFTData([str(write_packed_dataset(tmp_path / "d", packs, 8, 100))], None, seed=0)
    order = [pack for _, pack in data.order.slots(0, 4)]
    groups = [order[:2], order[2:]]
    n_total = 12
    expected_weight = {p: n_total / (2 * sum(targets[q] for q in g)) for g in groups for p in g}

    def token_loss(labels):  # any per-position loss will do: a function of the label
        return 0.1 * labels.double() + 1.0

    expected_loss = np.mean(
        [
            sum(
                float(token_loss(torch.tensor(ids[1:])).double().mul(torch.tensor(mask[1:])).sum())
                for p in g
                for ids, mask in packs[p]
            )
            / sum(targets[p] for p in g)
            for g in groups
        ]
    )
    for layout, dp in [(ParallelLayout(), 1), (ParallelLayout(), 2), (ParallelLayout(micro_batch_size=2), 1)]:
        rows = [mb for r in range(dp) for mb in data.micro_batches(0, 4, layout, r, dp, loss_group_size=2)]
        weights = torch.cat([mb.loss_mask.view(-1) for mb in rows]).double()
        labels = torch.cat([mb.labels.view(-1) for mb in rows])
        assert int((weights > 0).sum()) == n_total and float(weights.sum()) == pytest.approx(n_total)
        assert float((weights * token_loss(labels)).sum() / n_total) == pytest.approx(expected_loss, rel=1e-6)
        # pack by pack (one pack per 8-token row): each trained position carries its group's weight
        for position, pack in enumerate(order if layout.micro_batch_size == 1 else []):
            row = weights[position * 8 : (position + 1) * 8]
            assert row[row > 0].tolist() == pytest.approx([expected_weight[pack]] * targets[pack])


def test_datasets_of_one_run_share_a_chat_template(tmp_path):
    packs = random_packs(2, 8, 100, seed=0)
    first = write_packed_dataset(tmp_path / "a", packs, 8, 100)
    second = write_packed_dataset(tmp_path / "b", packs, 8, 100)
    assert SFTData([str(first), str(second)], None, seed=0).chat_template == "synthetic"
    meta_file = PackedDataset(str(second)).paths.meta
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "template": "AM-thinking"}))
    with pytest.raises(DataError, match=r"different chat templates \['AM-thinking', 'synthetic'\]"):
        SFTData([str(first), str(second)], None, seed=0)


def test_datasets_of_a_reasoning_template_share_its_thinking_setting(tmp_path):
    def packed(name: str, template: str, thinking: bool) -> str:
        prefix = write_packed_dataset(tmp_path / name, random_packs(2, 8, 100, seed=0), 8, 100)
        meta_file = PackedDataset(str(prefix)).paths.meta
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(
            json.dumps({**meta, "template": template, "settings": {"enable_thinking": thinking}})
        )
        return str(prefix)

    quiet = SFTData([packed("a", "qwen3", False), packed("b", "qwen3", False)], None, seed=0)
    assert quiet.training_data == {"chat_template": "qwen3", "enable_thinking": False}
    with pytest.raises(DataError, match="qwen3 template with and without --enable-thinking"):
        SFTData([packed("c", "qwen3", True), packed("d", "qwen3", False)], None, seed=0)
    # a template without thoughts to drop ignores the setting
    assert (
        SFTData([packed("e", "qwen", True), packed("f", "qwen", False)], None, seed=0).chat_template == "qwen"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "cp, lengths",
    [(2, [1, 3, 4, 7, 13]), (3, [1, 5, 6, 11, 20])],
    ids=["cp2", "cp3"],
)
def test_context_parallel_attention_equals_one_rank(cp, lengths):
    """Each rank's chunks through the all-gather attention give the single-rank packed attention's output
    and gradients at those positions: conversations of length 1, 2CP-1, 2CP, odd, and longer than a
    chunk, each padded to a multiple of 2 x CP."""
    from models.packed_attention import packed_causal_attention

    from mcore_ranks import context_parallel_attention_rank, packed_attention_inputs

    q, k, v, weights, cu = packed_attention_inputs(lengths, 2 * cp, seed=3)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    reference = packed_causal_attention(*full, cu, int((cu[1:] - cu[:-1]).max()), q.shape[-1] ** -0.5)
    (reference * weights).sum().backward()
    covered = []
    for rank in run_distributed(context_parallel_attention_rank, cp, lengths, 3):
        index = rank["index"]
        covered += index.tolist()
        assert torch.allclose(rank["out"], reference.detach().index_select(0, index), atol=1e-12)
        for got, whole in zip(rank["grads"], full, strict=True):
            assert torch.allclose(got, whole.grad.index_select(0, index), atol=1e-12)
    assert sorted(covered) == list(range(int(cu[-1])))  # every position on exactly one rank


def _varlen_semantics(query, key, value, cu_q, cu_k, max_q, max_k, *, scale, window_size, enable_gqa):
    """torch's varlen flash attention as flash attention defines it, on the CPU: segment i of the queries
    against segment i of the keys, causal (window (-1, 0)) aligned at the bottom right."""
    assert window_size == (-1, 0) and enable_gqa
    out = torch.empty_like(query)
    q_bounds, k_bounds = cu_q.tolist(), cu_k.tolist()
    assert max_q == max(np.diff(q_bounds)) and max_k == max(np.diff(k_bounds))
    for i in range(len(q_bounds) - 1):
        q = query[q_bounds[i] : q_bounds[i + 1]].transpose(0, 1)
        k, v = (t[k_bounds[i] : k_bounds[i + 1]].transpose(0, 1) for t in (key, value))
        allowed = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(k.shape[1] - q.shape[1])
        out[q_bounds[i] : q_bounds[i + 1]] = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True
        ).transpose(0, 1)
    return out


def test_context_parallel_chunks_for_the_varlen_kernel():
    """The CUDA route's segments (each query chunk against its conversation's keys up to the chunk's end,
    copied out contiguously), run through flash attention's varlen semantics on the CPU, give the
    single-rank attention at each rank's positions (the kernel itself: bench/gpu's attention stage)."""
    from models.packed_attention import ContextParallelChunks, _flash_varlen_chunks, packed_causal_attention
    from sft.data import context_parallel_indices

    from mcore_ranks import packed_attention_inputs

    cp, lengths = 4, [1, 7, 8, 9, 30]
    q, k, v, _, cu = packed_attention_inputs(lengths, 2 * cp, seed=5)
    reference = packed_causal_attention(q, k, v, cu, int((cu[1:] - cu[:-1]).max()), 8**-0.5)
    for rank in range(cp):
        index = torch.from_numpy(context_parallel_indices(cu.numpy(), cp, rank))
        chunks = ContextParallelChunks.build(cu, cp, rank)
        out = _flash_varlen_chunks((_varlen_semantics, True, True), q[index], k, v, chunks, 8**-0.5)
        assert torch.allclose(out, reference[index], atol=1e-12), rank
