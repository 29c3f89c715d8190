"""The evaluation stage through the real lm-evaluation-harness: fixed replies from a scripted model give
the hand-computed pass@1 and standard error; a tiny model generates through the `hf` backend with the
release's chat template; bad input is one named error with exit status 2."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

from common.errors import InputError
from evaluation.benchmarks import Benchmark, Problem, benchmark_named, read_benchmark
from evaluation.harness import chat_messages, run_benchmarks, write_outputs
from evaluation.settings import EvalSettings, load_profile
from testing.scripted_lm import ScriptedLM

from tools_runner import run_tool

AIME = [
    {"id": "p1", "problem": "What is 1 + 1?", "answer": "2"},
    {"id": "p2", "problem": "What is 1/2 + 1/3?", "answer": "\\frac{5}{6}"},
    {"id": "p3", "problem": "What is 3 + 4?", "answer": "7"},
]
GPQA = [
    {
        "Record ID": "q1",
        "Question": "Which gas do plants take in?",
        "Correct Answer": "carbon dioxide",
        "Incorrect Answer 1": "helium",
        "Incorrect Answer 2": "neon",
        "Incorrect Answer 3": "argon",
    }
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def data_dir(tmp_path) -> Path:
    _write_jsonl(tmp_path / "data" / "aime24.jsonl", AIME)
    _write_jsonl(tmp_path / "data" / "gpqa_diamond.jsonl", GPQA)
    return tmp_path / "data"


def _letter_of(text: str, option: str) -> str:
    return re.search(rf"^([A-D])\) {re.escape(option)}$", text, re.M).group(1)


def test_fixed_replies_score_the_hand_computed_pass_at_1_through_the_harness(data_dir, tmp_path):
    settings = EvalSettings(
        temperature=0.6,
        top_p=0.95,
        max_new_tokens=5,
        samples=2,
        stop=("</answer>",),
        suffix="Put the answer in \\boxed{}.",
        choice_suffix="Answer with a letter.",
        system_prompt="SYS",
    )
    problems = {name: read_benchmark(data_dir, name) for name in ("aime24", "gpqa_diamond")}
    right = _letter_of(problems["gpqa_diamond"][0].text, "carbon dioxide")
    wrong = _letter_of(problems["gpqa_diamond"][0].text, "helium")
    lm = ScriptedLM(
        {
            "p1": ["<think>one and one</think> \\boxed{2}", "<think>hm</think> \\boxed{3}"],
            # \dfrac equals \frac; a right answer inside a <think> that never closes is wrong (truncated)
            "p2": ["<think>sum</think> <answer>\\dfrac{5}{6}", "<think>so it is \\boxed{\\frac{5}{6}} and"],
            "p3": ["<think>b</think> <answer>7", "<think>b</think> <answer>It is \\boxed{7}."],
            "q1": [f"<think>photosynthesis</think> <answer>({right})", f"<think>x</think> <answer>{wrong}"],
        }
    )
    evaluation = run_benchmarks(lm, problems, settings, count_tokens=lambda text: len(text.split()))

    aime, gpqa = evaluation.scores
    assert aime.pass_at_1 == pytest.approx(2 / 3) and aime.harness_pass_at_1 == pytest.approx(2 / 3)
    # per-problem shares 1/2, 1/2, 1: sample standard deviation sqrt(1/12), over sqrt(3) problems
    assert aime.stderr == pytest.approx(math.sqrt(1 / 12) / math.sqrt(3))
    assert (aime.problems, aime.samples_per_problem) == (3, 2)
    assert aime.thinking_unclosed == pytest.approx(1 / 6)
    # word counts 4, 2, 2, 5, 2, 4 against the cap of 5: one reply reached it
    assert aime.mean_reply_tokens == pytest.approx(19 / 6) and aime.hit_token_cap == pytest.approx(1 / 6)
    assert (gpqa.pass_at_1, gpqa.stderr, gpqa.problems) == (0.5, None, 1)

    replies = evaluation.replies["aime24"]
    assert [(r.problem_id, r.sample, r.correct) for r in replies] == [
        ("p1", 0, True), ("p1", 1, False), ("p2", 0, True), ("p2", 1, False), ("p3", 0, True), ("p3", 1, True)
    ]  # fmt: skip
    assert replies[1].answer == "3" and replies[3].answer is None and replies[3].thinking_unclosed
    assert [r.finish for r in replies] == ["stop", "stop", "stop", "length", "stop", "stop"]
    assert (
        replies[0].prompt == "[system] SYS\n[user] What is 1 + 1?\nPut the answer in \\boxed{}.\n[assistant] "
    )
    assert [r.answer for r in evaluation.replies["gpqa_diamond"]] == [right, wrong]
    # every problem asked twice with the settings' sampling
    assert len(lm.requests) == 2 * (3 + 1)
    assert lm.requests[0][1] == {
        "until": ["</answer>"], "do_sample": True, "temperature": 0.6, "top_p": 0.95, "max_gen_toks": 5
    }  # fmt: skip
    assert "[user] Which gas do plants take in?\n\nA) " in lm.requests[-1][0]
    assert lm.requests[-1][0].endswith("\nAnswer with a letter.\n[assistant] ")

    out = write_outputs(evaluation, tmp_path / "out", about={"model": "scripted"})
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["aime24"]["pass_at_1"] == pytest.approx(2 / 3) and results["model"] == "scripted"
    assert results["settings"]["samples"] == 2 and results["settings"]["system_prompt"] == "SYS"
    lines = [json.loads(line) for line in (out / "samples" / "aime24.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and lines[1]["reply"] == "<think>hm</think> \\boxed{3}" and lines[1]["gold"] == "2"
    table = (out / "results.md").read_text()
    assert "| pass@1 (%) | ± s.e. |" in table and table.splitlines()[0].endswith("| K2-Think SFT | AM SFT |")
    assert "| AIME 2024 | 66.7 | 16.7 | 3 | 2 | 16.7 | 3 | 79.3 | 84.3 |" in table  # beside the references
    assert "| GPQA-Diamond | 50.0 | - | 1 | 2 | 0.0 | " in table and table.endswith(" | - | - |\n")
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpqa_options_are_shuffled_by_the_seed_and_the_gold_letter_follows():
    """Over many questions the right answer lands on every letter; the same seed gives the same order."""
    from evaluation.benchmarks import _choice_problem

    def letters(seed):
        rows = [{**GPQA[0], "Question": f"Question {i}?"} for i in range(40)]
        return [_choice_problem(Path("gpqa.jsonl"), i, row, seed).gold for i, row in enumerate(rows)]

    assert set(letters(0)) == set("ABCD") and letters(0) == letters(0) and letters(0) != letters(1)
    for i in range(40):
        problem = _choice_problem(Path("gpqa.jsonl"), i, {**GPQA[0], "Question": f"Question {i}?"}, 0)
        assert _letter_of(problem.text, "carbon dioxide") == problem.gold


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    """A tiny random Qwen2 with the Qwen2.5 tokenizer and the recipe's chat template, as a release has."""
    from transformers import AutoTokenizer

    from formats.chat_template import AM_THINKING
    from testing.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("chat_model"), "qwen2", plain_init=True)
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    tokenizer.chat_template = AM_THINKING.jinja()
    tokenizer.save_pretrained(model)
    return model


def test_a_math_set_of_ones_own_is_read_by_its_file_name(tmp_path):
    _write_jsonl(tmp_path / "mine.jsonl", [{"problem": "What is 1 + 1?", "answer": "2"}])
    assert read_benchmark(tmp_path, "mine") == [Problem("0", "What is 1 + 1?", "2")]
    assert benchmark_named("mine", tmp_path) == Benchmark("mine", "mine", "math")
    with pytest.raises(InputError, match="unknown benchmark 'mine'"):
        benchmark_named("mine")  # without the data directory, only the registry's names


@pytest.mark.slow
def test_a_tiny_model_generates_through_the_hf_backend_with_its_chat_template(chat_model, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from formats.chat_template import AM_THINKING

    def evaluate(out: Path) -> int:
        common = ["--model", str(chat_model), "--data", str(data_dir), "--benchmarks", "aime24"]
        flags = [
            "--profile",
            "am",
            "--samples",
            "2",
            "--max-new-tokens",
            "6",
            "--limit",
            "2",
            "--device",
            "cpu",
        ]
        return run_tool("evaluate", [*common, *flags, "--output", str(out)])

    assert evaluate(tmp_path / "a") == 0 and evaluate(tmp_path / "b") == 0
    first = (tmp_path / "a" / "samples" / "aime24.jsonl").read_text()
    assert (
        first == (tmp_path / "b" / "samples" / "aime24.jsonl").read_text()
    )  # the same seed, the same replies
    lines = [json.loads(line) for line in first.splitlines()]
    assert [(r["problem_id"], r["sample"]) for r in lines] == [("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)]
    suffix = load_profile("am").suffix
    assert lines[0]["prompt"] == (
        f"<|im_start|>system\n{AM_THINKING.default_system}<|im_end|>\n"
        f"<|im_start|>user\nWhat is 1 + 1?\n{suffix}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert all(1 <= r["reply_tokens"] <= 6 for r in lines) and lines[0]["reply"] != lines[1]["reply"]
    # the length check renders the same prompt as the harness
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    problem = read_benchmark(data_dir, "aime24")[0]
    messages = chat_messages(problem, "math", load_profile("am"))
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == lines[0]["prompt"]
    )
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["settings"]["temperature"] == 0.6 and results["settings"]["max_new_tokens"] == 6
    assert results["scores"]["aime24"]["problems"] == 2 and results["backend"] == "hf"
    assert (
        results["longest_prompt_tokens"]
        == max(len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in lines)
        and results["context_tokens"] == 32768
    )
    assert Path(results["model"]["files"][0]["path"]).name == "config.json"


def test_bad_input_is_one_named_error(qwen_tokenizer_dir, data_dir, tmp_path, capsys):
    """Each is found before any weights are read: a model directory of a config and a tokenizer will do."""
    model = tmp_path / "model"
    shutil.copytree(qwen_tokenizer_dir, model)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2"}))

    def error(*flags: str) -> str:
        argv = ["--model", str(model), "--data", str(data_dir), "--output", str(tmp_path / "out"), *flags]
        assert run_tool("evaluate", argv) == 2
        return capsys.readouterr().err

    unknown = error("--benchmarks", "aime2024")
    assert "unknown benchmark 'aime2024'; the benchmarks are: aime24" in unknown
    assert "or a math set of your own: aime2024.jsonl with `problem` and `answer` columns" in unknown
    assert "holds no math500.jsonl or math500.parquet" in error("--benchmarks", "math500")
    assert "samples is 0: at least 1" in error("--samples", "0")
    assert "no evaluation profile 'k2'" in error("--profile", "k2")
    assert f"{tmp_path / 'nowhere'}: no such data directory" in error("--data", str(tmp_path / "nowhere"))
    _write_jsonl(data_dir / "math500.jsonl", [{"problem": "x"}])
    assert "math500.jsonl, row 0: no 'answer'" in error("--benchmarks", "math500")
    _write_jsonl(data_dir / "math500.jsonl", [{"id": "a", "problem": "x", "answer": "1"}] * 2)
    assert "math500.jsonl, row 1: id 'a' again (row 0)" in error("--benchmarks", "math500")
    assert "the tokenizer has no chat template" in error("--benchmarks", "aime24")

    from transformers import AutoTokenizer

    from formats.chat_template import AM_THINKING

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = AM_THINKING.jinja()
    tokenizer.save_pretrained(model)
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "max_position_embeddings": 200}))
    too_long = error("--benchmarks", "aime24", "--max-new-tokens", "150")
    assert re.search(
        r"the longest prompt \((\d+) tokens\) and --max-new-tokens 150 need \d+ tokens, over", too_long
    )
    assert "context of 200 (config.json max_position_embeddings): lower --max-new-tokens" in too_long
    # vLLM is never installed beside the training stack: the tool says where it lives
    no_vllm = error("--benchmarks", "aime24", "--max-new-tokens", "8", "--backend", "vllm")
    assert "requirements/eval-gpu.txt" in no_vllm
