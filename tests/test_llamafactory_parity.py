"""Registry datasets against LLaMA-Factory 0.9.3's own encoding, token for token.

The golden files (tests/data/llamafactory/golden, written by testing/llamafactory_golden.py from
LLaMA-Factory's `get_dataset` on the same dataset_info.json and the same offline tokenizer) hold every
example LLaMA-Factory keeps, per template and loss option. Our preprocessor reads the same registry,
all four datasets as one mixture (alpaca with history and system, sharegpt with tools and function
calls, OpenAI-style messages described by tags, reasoning traces; rows LLaMA-Factory drops among
them; the traces drawn again with num_samples, below and above their count, so the rows drawn must be
LLaMA-Factory's), and the packed files it writes must hold exactly those examples: the same token ids,
the same loss masks, as often, nothing more; the drops counted per dataset.
"""

from __future__ import annotations

from collections import Counter

import pytest

from formats.packed import indexed_dataset_module
from formats.tokenizer import tokenizer_fingerprint
from preprocess.config import PreprocessConfig
from preprocess.pipeline import preprocess
from testing.llamafactory_golden import CASES, DATA_DIR, DATASETS, SEED, SEQ_LENGTH, read_golden

# What LLaMA-Factory drops of each dataset, read off the inputs (testing/llamafactory_inputs.py).
EXPECTED_DROPS = {
    "alpaca_history": {"no_response": 1},
    "sharegpt_tools": {"invalid_role_tag": 1, "invalid_message_count": 1, "empty_conversations": 2},
    "openai_messages": {"invalid_role_tag": 1},
    "reasoning": {},
    "reasoning_subset": {},
    "reasoning_repeated": {},
}


def packed_conversations(prefix) -> Counter:
    IndexedDataset = indexed_dataset_module().IndexedDataset
    ids, mask = IndexedDataset(f"{prefix}_input_ids"), IndexedDataset(f"{prefix}_loss_mask")
    return Counter((tuple(ids[i].tolist()), tuple(mask[i].tolist())) for i in range(len(ids)))


# Two cases in the fast suite (the recipe's template, and the one with a bos and another tool format).
FAST_CASES = ("am_thinking", "llama3")


@pytest.mark.parametrize(
    "case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow) for c in CASES]
)
def test_packed_examples_equal_llamafactory_s(case, qwen_tokenizer_dir, llama3_tokenizer_dir, tmp_path):
    header, golden = read_golden(case)
    template, kind, options = CASES[case]
    tokenizer = {"qwen": qwen_tokenizer_dir, "llama3": llama3_tokenizer_dir}[kind]
    assert tokenizer_fingerprint(tokenizer) == header["tokenizer_sha256"], (
        "the offline tokenizer changed since the golden files were made: regenerate them "
        "(python -m testing.llamafactory_golden)"
    )
    assert header["options"] == options and header["seq_length"] == SEQ_LENGTH
    cfg = PreprocessConfig(
        tokenizer=tokenizer,
        output_prefix=tmp_path / case,
        dataset_info=DATA_DIR / "dataset_info.json",
        dataset=",".join(DATASETS),
        template=template,
        seq_length=SEQ_LENGTH,
        workers=1,
        tool_date=header["tool_date"],
        seed=SEED,
        **options,
    )
    meta = preprocess(cfg, command=["test"])

    ours, theirs = packed_conversations(tmp_path / case), Counter(golden)
    assert sum(ours.values()) == sum(theirs.values()) == meta["stats"]["conversations"]
    assert ours == theirs
    assert meta["cutoff_len"] == header["cutoff_len"] == SEQ_LENGTH - 1
    # the long rows (one of them among the first 3): truncation is part of what is compared
    assert meta["stats"]["truncated"] >= (1 if "max_samples" in options else 2)
    per_dataset = meta["stats"]["per_dataset"]
    assert list(per_dataset) == list(DATASETS)
    if "max_samples" in options:  # each dataset's first 3 rows, the num_samples 2 draw's 2
        rows_read = {name: 2 if name == "reasoning_subset" else 3 for name in DATASETS}
        assert {name: counts["rows_read"] for name, counts in per_dataset.items()} == rows_read
    else:
        assert {name: counts["dropped"] for name, counts in per_dataset.items()} == EXPECTED_DROPS
    assert sum(c["conversations"] for c in per_dataset.values()) == len(golden)
    assert meta["template"] == template and [d["name"] for d in meta["datasets"]] == list(DATASETS)


def test_the_cases_differ_where_their_options_do():
    """The golden files are not one encoding under eight names: each option changes what it should."""
    qwen = Counter(read_golden("qwen")[1])
    ids = lambda case: sorted(ids for ids, _ in read_golden(case)[1])  # noqa: E731
    masks = lambda case: sum(sum(mask) for _, mask in read_golden(case)[1])  # noqa: E731
    assert ids("qwen_mask_history") != ids("qwen")  # truncation keeps the last turns instead
    assert masks("qwen_mask_history") < masks("qwen") < masks("qwen_train_on_prompt")
    assert ids("qwen_train_on_prompt") == ids("qwen")  # the same tokens, more of them trained
    assert ids("am_thinking") != ids("qwen")  # the default system prompts differ
    assert ids("qwen3") != ids("qwen3_no_thinking") and Counter(read_golden("qwen3")[1]) != qwen
    assert Counter(read_golden("qwen_max_samples")[1]) < qwen  # a part of the same examples
