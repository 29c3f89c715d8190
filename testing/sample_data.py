"""A small synthetic snapshot shaped like AM-Thinking-v1-Distilled, generated deterministically.

It is the demo's bundled sample and the tests' dataset fixture. Like the real snapshot it has six
subset files whose schemas differ (jsonl and parquet, extra and nested per-subset fields, an optional
top-level `system`), single- and multi-turn conversations, leading system turns, long reasoning answers
`<think>...</think> <answer>...</answer>` with a long-tailed length distribution (two conversations
exceed 32K tokens), non-ASCII text, and malformed rows. `write_sample_snapshot()` returns what a correct
aligner must report: rows kept per subset and rows dropped per reason. `write_eval_sample()` writes the
demo's evaluation set: a few arithmetic problems as a math benchmark file of tools/evaluate.py.

    python -m testing.sample_data OUT_DIR [--rows-per-subset 50] [--length-scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preprocess import conversation

WORDS = (
    "the of and to in is that for it as with be on by this are or an at from which we can all one has but "
    "let consider value equation number function therefore since because check again wait so total sum "
    "prime integer triangle angle radius area probability expected compute derive assume suppose case "
    "array index loop return string list graph node edge path cost memory time complexity test input output "
    "energy force mass velocity charge field wave reaction molecule cell protein gene temperature pressure"
).split()
UNICODE_SNIPPETS = (
    "设 x 为正整数，求最小值。",
    "La función f(x) = x² − 3x + 2 tiene raíces reales.",
    "Привет, мир! Решим уравнение.",
    "مرحبا بالعالم، لنحسب المجموع.",
    "東京の天気は晴れです。",
    "Größe ≤ 10⁻³ · π ≈ 3.14159 — naïve café.",
    "수학 문제를 풀어 봅시다.",
    "emoji 🙂🚀✨ and combining e\u0301 (NFD) vs é (NFC)",
)
SUBSETS = ("math", "code", "science", "if", "multiturn", "chat")


@dataclass
class SampleSnapshot:
    """Where the sample was written and what an aligner must find in it."""

    root: Path
    kept_per_subset: Counter = field(default_factory=Counter)
    dropped_per_reason: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return sum(self.kept_per_subset.values())


class _Writer:
    def __init__(self, rng: random.Random, length_scale: float = 1.0):
        self.rng = rng
        self.length_scale = length_scale

    def words(self, n: int) -> str:
        out = []
        for i in range(n):
            if i % 97 == 13:
                out.append(self.rng.choice(UNICODE_SNIPPETS))
            out.append(self.rng.choice(WORDS))
            if i % 17 == 16:
                out.append(".\n" if i % 51 == 50 else ".")
        return " ".join(out)

    def length(self, median: int) -> int:
        return max(5, int(self.rng.lognormvariate(0.0, 0.9) * median * self.length_scale))

    def question(self, median: int = 60) -> str:
        return self.words(self.length(median)) + "?"

    def reasoning_answer(self, median: int = 450, think_words: int | None = None) -> str:
        think = self.words(think_words if think_words is not None else self.length(median))
        answer = self.words(self.length(40))
        return f"<think>\n{think}\n</think> <answer>\n{answer}\n</answer>"

    def turn(self, role: str, value: Any, **extra: Any) -> dict[str, Any]:
        return {"from": role, "value": value, **extra}


def _math_row(w: _Writer, i: int) -> dict:
    q, a = w.question(), w.reasoning_answer()
    info = {"source": "synthetic-math", "reference_answer": str(i * 7 % 31), "test_case": None}
    return {"conversations": [w.turn("human", q, info=info), w.turn("assistant", a, info=info)]}


def _code_row(w: _Writer, i: int) -> dict:
    q = w.question() + "\n```python\ndef solve(xs: list[int]) -> int:\n    ...\n```"
    tests = {"inputs": [[i, i + 1]], "outputs": [2 * i + 1], "fn_name": "solve"}
    info = {"source": "synthetic-code", "test_case": json.dumps(tests), "difficulty": i % 5}
    return {
        "conversations": [
            w.turn("human", q, info=info),
            w.turn("assistant", w.reasoning_answer(600), info=info),
        ]
    }


def _science_row(w: _Writer, i: int) -> dict:
    row = {"conversations": [w.turn("human", w.question()), w.turn("assistant", w.reasoning_answer())]}
    if i % 3 == 0:  # a top-level system the recipe ignores (the seed's aligner drops it)
        row["system"] = "You are a careful scientist."
    row["meta"] = {"domain": w.rng.choice(["physics", "chemistry", "biology"]), "verified": bool(i % 2)}
    return row


def _if_row(w: _Writer, i: int) -> dict:
    constraints = [{"type": "length", "max_words": 100 + i}, {"type": "format", "style": "bullets"}]
    return {
        "conversations": [w.turn("human", w.question()), w.turn("assistant", w.reasoning_answer(200))],
        "constraints": constraints,
    }


def _multiturn_row(w: _Writer, i: int) -> dict:
    turns = []
    if i % 2 == 0:  # a leading system turn: in the recipe this is the sample's system text
        turns.append(w.turn("system", "" if i % 8 == 0 else "You are a patient tutor. Answer step by step."))
    for _ in range(2 + i % 3):
        turns += [w.turn("human", w.question(30)), w.turn("assistant", w.reasoning_answer(150))]
    return {"conversations": turns, "system": None if i % 4 else "top-level system text", "turns": len(turns)}


def _chat_row(w: _Writer, i: int) -> dict:
    q = w.rng.choice(UNICODE_SNIPPETS) + " " + w.question(20)
    return {
        "conversations": [w.turn("human", q), w.turn("assistant", w.reasoning_answer(120))],
        "lang": i % 7,
    }


def write_sample_snapshot(
    root: str | Path, rows_per_subset: int = 50, seed: int = 1234, length_scale: float = 1.0
) -> SampleSnapshot:
    """Writes the six subset files under `root` and returns the expected aligner counts.

    `length_scale` multiplies every drawn question and answer length (not the two long-tail rows): the
    demo uses short conversations so that a tiny model sees many reply openings per CPU second."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    w = _Writer(rng, length_scale)
    snap = SampleSnapshot(root)
    makers = {
        "math": _math_row,
        "code": _code_row,
        "science": _science_row,
        "if": _if_row,
        "multiturn": _multiturn_row,
        "chat": _chat_row,
    }
    rows = {name: [makers[name](w, i) for i in range(rows_per_subset)] for name in SUBSETS}
    # The long tail past 32K tokens: one huge answer, one huge prompt (both truncation branches).
    rows["math"][3]["conversations"][1]["value"] = w.reasoning_answer(think_words=36000)
    rows["code"][5]["conversations"][0]["value"] = w.words(34000) + "?"
    for name in SUBSETS:
        snap.kept_per_subset[name] = len(rows[name])

    bad: dict[str, list[tuple[str, Any]]] = {  # (reason, row) appended after the valid rows
        "math": [
            (conversation.MISSING_CONVERSATIONS, {"info": "no conversations field"}),
            (conversation.MALFORMED_TURN, {"conversations": [{"from": "human"}, w.turn("assistant", "x")]}),
        ],
        "code": [
            (
                conversation.NON_STRING_VALUE,
                {"conversations": [w.turn("human", "q"), w.turn("assistant", 42)]},
            ),
            (
                conversation.NON_STRING_VALUE,
                {"conversations": [w.turn("human", None), w.turn("assistant", "a")]},
            ),
        ],
        "science": [
            (conversation.UNKNOWN_ROLE, {"conversations": [w.turn("human", "q"), w.turn("gpt", "a")]}),
            (
                conversation.ROLES_OUT_OF_ORDER,
                {"conversations": [w.turn("assistant", "a"), w.turn("human", "q")]},
            ),
            (conversation.EMPTY_CONVERSATIONS, {"conversations": []}),
        ],
        "if": [
            (conversation.ROLES_OUT_OF_ORDER, {"conversations": [w.turn("human", "q")]}),
            (conversation.NOT_AN_OBJECT, [w.turn("human", "q"), w.turn("assistant", "a")]),
        ],
        "multiturn": [
            (
                conversation.ROLES_OUT_OF_ORDER,
                {"conversations": [w.turn("human", "q"), w.turn("human", "q2"), w.turn("assistant", "a")]},
            ),
            (
                conversation.ROLES_OUT_OF_ORDER,
                {
                    "conversations": [
                        w.turn("human", "q"),
                        w.turn("assistant", "a"),
                        w.turn("system", "late system"),
                    ]
                },
            ),
        ],
        "chat": [(conversation.MISSING_CONVERSATIONS, {"conversations": None, "lang": 1})],
    }
    for name in SUBSETS:
        for reason, row in bad[name]:
            snap.dropped_per_reason[reason] += 1
            rows[name].insert(rng.randrange(len(rows[name]) + 1), row)

    for name in ("math", "code", "science", "if"):
        with open(root / f"{name}.jsonl", "wb") as f:
            for row in rows[name]:
                f.write(json.dumps(row, ensure_ascii=name != "if").encode("utf-8") + b"\n")
            if name == "math":  # a line cut off mid-record, as after an interrupted download
                f.write(json.dumps(rows[name][0])[:80].encode() + b"\n")
                snap.dropped_per_reason[conversation.BROKEN_JSONL_LINE] += 1
            if name == "code":  # bytes that are not UTF-8
                f.write(
                    b'{"conversations": [{"from": "human", "value": "caf\xe9 \xff"}, '
                    b'{"from": "assistant", "value": "a"}]}\n'
                )
                snap.dropped_per_reason[conversation.UNDECODABLE_BYTES] += 1
            if name == "if":  # a lone surrogate escape: valid JSON, not encodable text
                f.write(
                    b'{"conversations": [{"from": "human", "value": "x \\ud800 y"}, '
                    b'{"from": "assistant", "value": "a"}]}\n'
                )
                snap.dropped_per_reason[conversation.UNDECODABLE_BYTES] += 1
                f.write(b"\n")  # blank lines are skipped, not counted
    for name in ("multiturn", "chat"):
        _write_parquet(root / f"{name}.parquet", rows[name])
    return snap


# The demo's evaluation set: questions of the form of its held-out probe, none in the training sample.
ARITHMETIC = (
    ("What is 17 + 25?", "42"),
    ("What is 6 times 7?", "42"),
    ("What is 100 - 58?", "42"),
    ("What is 3/4 + 1/4?", "1"),
)


def write_eval_sample(data_dir: Path, name: str = "arithmetic") -> Path:
    """data_dir/NAME.jsonl with ARITHMETIC (`id`, `problem`, `answer`), a math set of evaluate.py."""
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"a{i}", "problem": q, "answer": a} for i, (q, a) in enumerate(ARITHMETIC, 1)]
    (data_dir / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return data_dir


def _write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=16)


def main(argv: list[str] | None = None) -> SampleSnapshot:
    parser = argparse.ArgumentParser(
        prog="python -m testing.sample_data",
        description="Write the synthetic AM-Thinking-shaped snapshot (six subset files, malformed rows "
        "included on purpose) that tools/get_am_dataset.py --source reads.",
    )
    parser.add_argument("out_dir", help="directory to write the subset files to (created)")
    parser.add_argument(
        "--rows-per-subset", type=int, default=50, help="valid rows per subset file (default 50)"
    )
    parser.add_argument(
        "--length-scale",
        type=float,
        default=1.0,
        help="multiply each drawn question and answer length (the two long-tail rows past 32K tokens "
        "excepted); the demo uses 0.02 (default 1)",
    )
    parser.add_argument("--seed", type=int, default=1234, help="the generator's seed (default 1234)")
    args = parser.parse_args(argv)
    snapshot = write_sample_snapshot(args.out_dir, args.rows_per_subset, args.seed, args.length_scale)
    print(
        f"wrote {snapshot.root}: {snapshot.kept} valid rows, {sum(snapshot.dropped_per_reason.values())} "
        "malformed"
    )
    return snapshot


if __name__ == "__main__":
    main()
