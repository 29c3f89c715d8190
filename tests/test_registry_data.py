"""Datasets described by a LLaMA-Factory registry: entries read and refused, files and directories,
the hub at a pinned revision, num_samples, mixtures, the rows LLaMA-Factory would stop on (dropped and
counted here), the loss options, and the recipe's aligned parquet read through a registry entry.

Token-level parity with LLaMA-Factory itself is tests/test_llamafactory_parity.py; here the expected
values are counts and hand-worked masks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.errors import InputError
from formats.packed import indexed_dataset_module
from preprocess.config import PreprocessConfig
from preprocess.pipeline import preprocess
from preprocess.registry import dataset_entries
from preprocess.sft_encoding import LossOptions, encode_pairs
from testing.llamafactory_golden import DATA_DIR

from tools_runner import run_tool

ROOT = Path(__file__).resolve().parents[1]
SEQ = 256


def chat(*texts: str) -> list[dict[str, str]]:
    return [{"from": ("human", "gpt")[i % 2], "value": text} for i, text in enumerate(texts)]


def write_registry(folder: Path, entries: dict, files: dict[str, list[dict]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (files or {}).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".parquet"):
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    return folder / "dataset_info.json"


def run(registry: Path, names: str, tokenizer: Path, prefix: Path, **overrides) -> dict:
    cfg = PreprocessConfig(
        tokenizer=tokenizer,
        output_prefix=prefix,
        dataset_info=registry,
        dataset=names,
        seq_length=SEQ,
        workers=1,
        template="qwen",
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return preprocess(cfg, command=["test"])


def packed(prefix: Path) -> Counter:
    IndexedDataset = indexed_dataset_module().IndexedDataset
    ids, mask = IndexedDataset(f"{prefix}_input_ids"), IndexedDataset(f"{prefix}_loss_mask")
    return Counter((tuple(ids[i].tolist()), tuple(mask[i].tolist())) for i in range(len(ids)))


# The aligned AM-Thinking parquet's turns, as a registry entry describes them (the README's example).
AM_TAGS = {
    "role_tag": "from",
    "content_tag": "value",
    "user_tag": "human",
    "assistant_tag": "assistant",
    "system_tag": "system",
}
ROWS = [{"conversations": chat(f"question {i}", f"answer {i}")} for i in range(5)]
SHAREGPT = {"formatting": "sharegpt"}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"file_name": "nowhere.jsonl"}, "file_name .*nowhere.jsonl does not exist"),
        (
            {"file_name": "rows.jsonl", "formatting": "openai"},
            "formatting 'openai' is not one of alpaca, sharegpt",
        ),
        ({"file_name": "rows.jsonl", "ranking": True}, "ranking .* not supervised fine-tuning"),
        ({"ms_hub_url": "x/y"}, "ModelScope datasets are not supported"),
        ({"file_name": "rows.jsonl", "columns": {"images": "img"}}, "column 'images' .multimodal data"),
        ({"file_name": "rows.jsonl", "columns": {"answer": "a"}}, "unknown columns answer"),
        ({"file_name": "rows.jsonl", "num_samples": 0}, "num_samples must be a positive integer"),
        ({"file_name": "rows.csv"}, ".*rows.csv is not one of the file types json, jsonl, parquet"),
        ({"formatting": "sharegpt"}, "needs `file_name`"),
    ],
)
def test_registry_entries_are_checked_and_named(tmp_path, entry, message):
    registry = write_registry(tmp_path, {"mine": entry}, {"rows.jsonl": ROWS, "rows.csv": []})
    with pytest.raises(InputError, match=f"dataset 'mine': {message}"):
        dataset_entries(registry, ["mine"])


def test_registry_names_and_files_are_checked(tmp_path):
    registry = write_registry(tmp_path, {"a": {"file_name": "rows.jsonl"}}, {"rows.jsonl": ROWS})
    with pytest.raises(InputError, match="has no dataset 'b'; it has a"):
        dataset_entries(registry, ["a", "b"])
    with pytest.raises(InputError, match="names a dataset twice"):
        dataset_entries(tmp_path, ["a", "a"])  # the folder holding dataset_info.json works too
    (tmp_path / "bad" / "dataset_info.json").parent.mkdir()
    (tmp_path / "bad" / "dataset_info.json").write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        dataset_entries(tmp_path / "bad", ["a"])
    mixed = write_registry(
        tmp_path / "mixed", {"d": {"file_name": "dir"}}, {"dir/a.jsonl": ROWS, "dir/b.parquet": ROWS}
    )
    with pytest.raises(InputError, match="must all be json/jsonl or all parquet"):
        dataset_entries(mixed, ["d"])


def test_unset_columns_and_tags_follow_llamafactory(tmp_path):
    registry = write_registry(
        tmp_path,
        {
            "plain": {"file_name": "rows.jsonl"},
            "given": {
                "file_name": "rows.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                },
            },
        },
        {"rows.jsonl": ROWS},
    )
    plain, given = dataset_entries(registry, ["plain", "given"])
    assert (plain.columns.prompt, plain.columns.query, plain.columns.response) == (
        "instruction",
        "input",
        "output",
    )
    assert (plain.tags.assistant_tag, plain.tags.system_tag) == ("gpt", "system")  # ShareGPT's defaults
    # Once `columns`/`tags` is given, what it leaves out is unset (LLaMA-Factory's DatasetAttr.join).
    assert (given.columns.messages, given.columns.prompt, given.columns.system) == ("messages", None, None)
    assert (given.tags.user_tag, given.tags.system_tag, given.tags.observation_tag) == ("user", None, None)


def test_a_missing_field_and_a_broken_file_are_errors_naming_them(tmp_path, qwen_tokenizer_dir):
    registry = write_registry(
        tmp_path,
        {
            "alpaca": {
                "file_name": "alpaca.jsonl",
                "columns": {"prompt": "instruction", "response": "answer"},
            },
            "broken": {"file_name": "broken.jsonl", **SHAREGPT},
        },
        {"alpaca.jsonl": [{"instruction": "q", "output": "a"}], "broken.jsonl": ROWS},
    )
    with open(tmp_path / "broken.jsonl", "a") as f:
        f.write('{"conversations": [oops\n')
    with pytest.raises(
        InputError, match=r"dataset 'alpaca', file .*alpaca.jsonl: no row has the field 'answer'"
    ):
        run(registry, "alpaca", qwen_tokenizer_dir, tmp_path / "a")
    with pytest.raises(
        InputError, match=r"dataset 'broken', file .*broken.jsonl: cannot be read after row \d+"
    ):
        run(registry, "broken", qwen_tokenizer_dir, tmp_path / "b")
    assert not list(tmp_path.glob("a_*")) and not list(tmp_path.glob("b_*"))  # nothing half-written


def test_rows_llamafactory_would_stop_on_are_dropped_and_counted(tmp_path, qwen_tokenizer_dir, caplog):
    rows = [
        {"conversations": chat("fine", "kept")},
        {"conversations": chat("q", None)},  # LLaMA-Factory: "Expected a string"
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "not json"}]},
        {"conversations": chat("q", "a"), "tools": [{"name": "f"}]},  # a list, not a JSON string
        {"conversations": chat("q", "a"), "tools": "{broken"},
        {"conversations": "not a list"},
    ]
    registry = write_registry(
        tmp_path,
        {
            "odd": {
                "file_name": "odd.jsonl",
                **SHAREGPT,
                "columns": {"messages": "conversations", "tools": "tools"},
            }
        },
    )
    (tmp_path / "odd.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    meta = run(registry, "odd", qwen_tokenizer_dir, tmp_path / "odd")
    assert meta["stats"]["conversations"] == 1
    assert meta["stats"]["per_dataset"]["odd"]["dropped"] == {
        "malformed_turn": 1,
        "non_string_value": 1,
        "invalid_tools": 2,
        "invalid_function_call": 1,
    }
    # most of the dataset is lost: a warning with the same hints as the error for a dataset lost whole
    assert (
        "only 1 of its 6 rows are kept (dropped: malformed_turn 1, non_string_value 1, invalid_tools 2, "
        "invalid_function_call 1); its tools (column 'tools'): a list, not a string (1 row), tools are not "
        "JSON (1 row); LLaMA-Factory reads tools"
    ) in caplog.text
    assert (
        "its function-call turns: a function call is not JSON (1 row); each is the JSON of a call"
        in caplog.text
    )


def openai_messages(*texts: str, system: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": ("user", "assistant")[i % 2], "content": text} for i, text in enumerate(texts)]
    return ([{"role": "system", "content": system}] if system else []) + turns


def test_a_dataset_that_keeps_no_row_stops_the_run_naming_what_to_change(tmp_path, qwen_tokenizer_dir):
    """A registry mistake that drops a whole dataset is an error before anything is written, even when the
    other datasets are fine: the dataset, its drops, the role tags its rows hold against those its entry
    expects, and what LLaMA-Factory reads tools as."""
    chats = [{"messages": openai_messages("q", "a", system="be brief")} for _ in range(3)]
    entries = {
        "good": {"file_name": "good.jsonl", **SHAREGPT},
        # the rows' user role is "user", the entry says "human" (and no system tag)
        "chats": {
            "file_name": "chats.jsonl",
            **SHAREGPT,
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "human",
                "assistant_tag": "assistant",
            },
        },
        # OpenAI messages without "tags": sharegpt's default role key "from" is in no message
        "untagged": {"file_name": "chats.jsonl", **SHAREGPT, "columns": {"messages": "messages"}},
        "tools": {
            "file_name": "tools.jsonl",
            **SHAREGPT,
            "columns": {"messages": "conversations", "tools": "tools"},
        },
    }
    tools = [{"conversations": chat("q", "a"), "tools": [{"name": "f", "parameters": {}}]} for _ in range(2)]
    # the entry's own role names, out of order: two user turns, then two answers
    entries["order"] = {"file_name": "order.jsonl", **SHAREGPT}
    order = [{"conversations": chat("q")[:1] * 2 + chat("q", "a")[1:] * 2}]
    registry = write_registry(
        tmp_path,
        entries,
        {"good.jsonl": ROWS, "chats.jsonl": chats, "tools.jsonl": tools, "order.jsonl": order},
    )
    with pytest.raises(InputError) as info:
        run(registry, "good,chats,untagged,tools,order", qwen_tokenizer_dir, tmp_path / "out")
    lines = str(info.value).split("\n  - ")
    assert lines[0] == "nothing written: a dataset keeps no conversation" and len(lines) == 5
    assert lines[4] == (
        f"dataset 'order' ({tmp_path / 'order.jsonl'}): none of its 1 row is kept (dropped: "
        "invalid_role_tag 1); its messages' role tags ('human' (1 row), 'gpt' (1 row)) are the entry's, out "
        "of the order LLaMA-Factory requires: a user or observation turn first, then assistant or function "
        "turns alternating"
    )
    openai_tags = (
        '"tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": '
        '"assistant", "system_tag": "system"}'
    )
    assert lines[1] == (
        f"dataset 'chats' ({tmp_path / 'chats.jsonl'}): none of its 3 rows is kept "
        "(dropped: invalid_role_tag 3); its messages' role tags are 'system' (3 rows), 'user' (3 rows), "
        "'assistant' (3 rows); the entry expects role_tag 'role', content_tag 'content', user_tag 'human', "
        "assistant_tag 'assistant' (a user or observation turn first, then assistant or function turns "
        'alternating; LLaMA-Factory\'s defaults where the entry gives no "tags"): set the entry\'s "tags" '
        f"to the rows' names; an OpenAI-messages file needs {openai_tags}"
    )
    assert lines[2].startswith(
        f"dataset 'untagged' ({tmp_path / 'chats.jsonl'}): none of its 3 rows is kept (dropped: "
        "invalid_role_tag 3); its messages' role tags are no 'from' key (its keys: 'content', 'role') "
        "(3 rows); the entry expects role_tag 'from', content_tag 'value', user_tag 'human', "
        "assistant_tag 'gpt', observation_tag 'observation', function_tag 'function_call', "
        "system_tag 'system'"
    )
    assert lines[3] == (
        f"dataset 'tools' ({tmp_path / 'tools.jsonl'}): none of its 2 rows is kept "
        "(dropped: invalid_tools 2); its tools (column 'tools'): a list, not a string (2 rows); "
        "LLaMA-Factory reads tools only as a JSON string of a list of tool objects: store each row's tools "
        "as json.dumps(tools)"
    )
    assert sorted(path.name for path in tmp_path.iterdir() if path.name.startswith("out")) == []
    # the same entries fixed as the messages say: every dataset is kept
    entries["chats"]["tags"]["user_tag"] = "user"
    entries["chats"]["tags"]["system_tag"] = "system"
    entries["untagged"]["tags"] = json.loads(openai_tags.split(": ", 1)[1])
    for row in tools:
        row["tools"] = json.dumps(row["tools"])
    registry = write_registry(tmp_path, entries, {"tools.jsonl": tools})
    meta = run(registry, "good,chats,untagged,tools", qwen_tokenizer_dir, tmp_path / "out")
    assert [c["conversations"] for c in meta["stats"]["per_dataset"].values()] == [5, 3, 3, 2]


def test_held_out_conversations_are_counted_per_dataset(tmp_path, qwen_tokenizer_dir):
    """With --valid-fraction, each dataset's line says how many of its conversations were held out; registry
    rows have no subsets, so none are listed."""
    from preprocess.meta import report

    many = [{"conversations": chat(f"question {i}", f"answer {i}")} for i in range(40)]
    registry = write_registry(
        tmp_path,
        {"a": {"file_name": "a.jsonl", **SHAREGPT}, "b": {"file_name": "b.parquet", **SHAREGPT}},
        {"a.jsonl": many[:25], "b.parquet": many[25:]},
    )
    meta = run(registry, "a,b", qwen_tokenizer_dir, tmp_path / "out", valid_fraction=0.3)
    per_dataset = meta["stats"]["per_dataset"]
    valid = json.loads((tmp_path / "out_valid_meta.json").read_text())["stats"]["per_dataset"]
    for name, rows in (("a", 25), ("b", 15)):
        assert per_dataset[name]["held_out"] == valid[name]["conversations"]
        assert per_dataset[name]["conversations"] + per_dataset[name]["held_out"] == rows
    assert sum(c["held_out"] for c in per_dataset.values()) == meta["split"]["valid_conversations"] > 0
    assert meta["stats"]["per_subset"] == {}
    text = report(meta)
    a = per_dataset["a"]
    assert f"{a['conversations']} conversations (+{a['held_out']} held out) of 25 rows" in text
    assert "subset" not in text


def test_a_directory_of_files_reads_as_their_concatenation_in_name_order(tmp_path, qwen_tokenizer_dir):
    registry = write_registry(
        tmp_path,
        {"dir": {"file_name": "parts", **SHAREGPT}, "one": {"file_name": "all.jsonl", **SHAREGPT}},
        {"parts/b.jsonl": ROWS[2:], "parts/a.jsonl": ROWS[:2], "all.jsonl": ROWS},
    )
    (tmp_path / "parts" / ".hidden").write_text("ignored")
    assert [p.name for p in dataset_entries(registry, ["dir"])[0].files] == ["a.jsonl", "b.jsonl"]
    run(registry, "dir", qwen_tokenizer_dir, tmp_path / "dir")
    run(registry, "one", qwen_tokenizer_dir, tmp_path / "one")
    assert packed(tmp_path / "dir") == packed(tmp_path / "one")


def test_num_samples_draws_seeded_and_counts_what_it_drew(tmp_path, qwen_tokenizer_dir):
    registry = write_registry(
        tmp_path,
        {
            "down": {"file_name": "rows.jsonl", **SHAREGPT, "num_samples": 2},
            "up": {"file_name": "rows.parquet", **SHAREGPT, "num_samples": 12},
        },
        {"rows.jsonl": ROWS, "rows.parquet": ROWS},
    )
    meta = run(registry, "down,up", qwen_tokenizer_dir, tmp_path / "a")
    per_dataset = meta["stats"]["per_dataset"]
    assert (per_dataset["down"]["rows_read"], per_dataset["up"]["rows_read"]) == (2, 12)
    assert [d["num_samples"] for d in meta["datasets"]] == [2, 12]
    conversations = packed(tmp_path / "a")
    # Asked for more rows than there are, `up` has every row once and 7 more at random: all 5 appear.
    assert sum(conversations.values()) == 14 and len(conversations) == 5
    # The same draw for the same seed, another for another.
    run(registry, "down,up", qwen_tokenizer_dir, tmp_path / "b")
    assert packed(tmp_path / "b") == conversations
    run(registry, "down,up", qwen_tokenizer_dir, tmp_path / "c", seed=7)
    assert packed(tmp_path / "c") != conversations


def test_mask_history_and_train_on_prompt_hand_worked():
    pairs = [([1, 2], [3, 4]), ([5], [6, 7]), ([8, 9], [10])]
    assert encode_pairs(pairs, 100) == ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [0, 0, 1, 1, 0, 1, 1, 0, 0, 1], 10)
    last_only = LossOptions(mask_history=True)
    assert encode_pairs(pairs, 100, last_only)[1] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    # The budget goes to the last pairs first: with 6 tokens, pair 3 (3) and pair 2 (3) fit; pair 1 is lost.
    assert encode_pairs(pairs, 6, last_only) == ([5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 0, 1], 10)
    everything = LossOptions(train_on_prompt=True)
    assert encode_pairs(pairs, 7, everything) == ([1, 2, 3, 4, 5, 6, 7], [1] * 7, 10)
    with pytest.raises(InputError, match="cannot be used together"):
        LossOptions(train_on_prompt=True, mask_history=True).validate()


def test_the_cli_takes_a_registry_and_refuses_what_does_not_go_together(tmp_path, qwen_tokenizer_dir, capsys):
    registry = DATA_DIR / "dataset_info.json"
    common = ["--tokenizer", str(qwen_tokenizer_dir), "--seq-length", "512", "--workers", "1"]
    out = tmp_path / "mix"
    argv = ["--dataset-info", str(registry), "--dataset", "sharegpt_tools,reasoning", "--template", "qwen3"]
    assert run_tool("preprocess_sft", [*argv, *common, "--output-prefix", str(out)]) == 0
    meta = json.loads(Path(f"{out}_meta.json").read_text())
    assert meta["template"] == "qwen3" and list(meta["stats"]["per_dataset"]) == [
        "sharegpt_tools",
        "reasoning",
    ]
    assert "dataset sharegpt_tools" in capsys.readouterr().out  # the summary counts per dataset
    for extra, message in (
        (["--mask-history", "--train-on-prompt"], "cannot be used together"),
        (["--template", "llama3"], "has no <|eot_id|> token"),  # Llama 3's template on a Qwen tokenizer
        (["--template", "chatml"], "chat template 'chatml' is unknown"),
        (["--input", str(registry)], "give either --input"),
        (["--system-source", "column"], "--system-source applies to --input"),
    ):
        assert (
            run_tool("preprocess_sft", [*argv, *common, "--output-prefix", str(tmp_path / "x"), *extra]) == 2
        )
        assert message in capsys.readouterr().err
    assert (
        run_tool("preprocess_sft", ["--dataset-info", str(registry), *common, "--output-prefix", str(out)])
        == 2
    )
    assert "needs --dataset" in capsys.readouterr().err


def test_the_aligned_parquet_through_a_registry_entry_equals_the_input_path(
    aligned_parquet, qwen_tokenizer_dir, tmp_path
):
    registry = write_registry(
        tmp_path,
        {
            "am_thinking": {
                "file_name": str(aligned_parquet),
                "formatting": "sharegpt",
                "tags": AM_TAGS,
            }
        },
    )
    direct = PreprocessConfig(
        input=aligned_parquet,
        tokenizer=qwen_tokenizer_dir,
        output_prefix=tmp_path / "direct",
        seq_length=2048,
        workers=1,
    )
    preprocess(direct)
    meta = run(
        registry,
        "am_thinking",
        qwen_tokenizer_dir,
        tmp_path / "registry",
        seq_length=2048,
        template="am-thinking",
    )
    for suffix in ("input_ids.bin", "input_ids.idx", "loss_mask.bin", "loss_mask.idx"):
        assert (tmp_path / f"direct_{suffix}").read_bytes() == (tmp_path / f"registry_{suffix}").read_bytes()
    assert meta["template"] == "AM-thinking"


@pytest.mark.slow  # a subprocess: huggingface_hub reads HF_ENDPOINT at import, as for a user
def test_a_hub_dataset_at_a_pinned_revision(tmp_path, qwen_tokenizer_dir):
    from testing.local_hub import LocalHub

    data = tmp_path / "repo"
    (data / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(ROWS), data / "data" / "train-00000-of-00001.parquet")
    commit = "1" * 40
    local = write_registry(
        tmp_path / "local", {"rows": {"file_name": "rows.jsonl", **SHAREGPT}}, {"rows.jsonl": ROWS}
    )
    run(local, "rows", qwen_tokenizer_dir, tmp_path / "local_out")
    for revision, status in ((commit, 0), ("0" * 40, 2)):
        registry = write_registry(
            tmp_path / f"hub_{status}",
            {"rows": {"hf_hub_url": "team/rows", "revision": revision, **SHAREGPT}},
        )
        with LocalHub.from_directory("team/rows", data, commit) as hub:
            env = {
                **os.environ,
                "HF_ENDPOINT": hub.endpoint,
                "HF_HOME": str(tmp_path / "hf"),
                "HF_HUB_DISABLE_TELEMETRY": "1",
            }
            env.pop("HF_HUB_OFFLINE", None)
            cmd = [sys.executable, str(ROOT / "tools" / "preprocess_sft.py"), "--dataset-info", str(registry)]
            cmd += ["--dataset", "rows", "--template", "qwen", "--tokenizer", str(qwen_tokenizer_dir)]
            cmd += [
                "--seq-length",
                str(SEQ),
                "--workers",
                "1",
                "--output-prefix",
                str(tmp_path / f"hub_{status}" / "out"),
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == status, done.stderr[-3000:]
        if status:
            assert "dataset 'rows' (hub team/rows@0000" in done.stderr and "no revision 0000" in done.stderr
        else:
            assert packed(tmp_path / "hub_0" / "out") == packed(tmp_path / "local_out")
