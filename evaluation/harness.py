"""Benchmarks through lm-evaluation-harness: one generation task per benchmark, graded by `grading`.

    evaluation = run_benchmarks(lm, {"aime24": problems}, settings, count_tokens)
    write_outputs(evaluation, Path("out/eval"), about={"model": ...})

Each benchmark becomes an lm-eval `generate_until` task built here (its problems, the profile's user-turn
suffix, sampling and stop strings, `repeats` = samples per problem), run by `lm_eval.simple_evaluate`
with the model's own chat template (the system prompt: the settings', else the template's default,
which for a release of this project is the one it was trained with). lm-eval hands each problem's
replies to our `process_results`, in the main process (math-verify's alarms need it), which grades
every reply and records it.

The figures per benchmark: pass@1 (the mean over problems of the share of right replies), its standard
error over problems, the share of replies that reached the token cap and of those whose thinking never
closed (graded wrong), and the mean reply length. A reply's tokens are counted by re-encoding its text
with the model's tokenizer (the harness returns text): a reply counts as cut off by the cap when that
count reaches `max_new_tokens`.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.files import atomic_directory

from .benchmarks import Problem, benchmark_of
from .grading import chosen_option, final_answer, is_correct
from .references import REFERENCES
from .settings import EvalSettings


@dataclass(frozen=True)
class GradedReply:
    problem_id: str
    sample: int  # its index among the problem's replies
    prompt: str  # as rendered by the chat template
    reply: str
    answer: str | None  # the extracted final answer (or option letter)
    gold: str
    correct: bool
    reply_tokens: int
    finish: str  # "length": it reached the token cap; "stop": a stop string or the end of turn
    thinking_unclosed: bool  # <think> never closed: graded wrong


@dataclass(frozen=True)
class BenchmarkScore:
    name: str
    title: str
    pass_at_1: float
    stderr: float | None  # over problems; None for a single problem
    problems: int
    samples_per_problem: int
    hit_token_cap: float  # share of replies
    thinking_unclosed: float  # share of replies
    mean_reply_tokens: float
    harness_pass_at_1: float  # lm-eval's own aggregate of our per-problem scores (the same figure)


@dataclass
class Evaluation:
    scores: list[BenchmarkScore]
    replies: dict[str, list[GradedReply]]
    settings: EvalSettings
    lm_eval_version: str


def grade(kind: str, reply: str, gold: str) -> tuple[str | None, bool, bool]:
    """(extracted answer, correct, thinking unclosed) of one reply."""
    answer = final_answer(reply)
    if kind == "choice":
        letter = chosen_option(answer)
        return letter, letter == gold, answer.truncated
    return answer.text, is_correct(answer, gold), answer.truncated


def chat_messages(problem: Problem, kind: str, settings: EvalSettings) -> list[dict[str, str]]:
    """The conversation a problem is asked as (lm-eval renders the same through the chat template): the
    settings' system turn, if any, else none, so that the template's default applies; the user turn."""
    system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    return [*system, {"role": "user", "content": settings.user_turn(problem.text, kind)}]


def longest_prompt(tokenizer, problems: dict[str, list[Problem]], settings: EvalSettings) -> int:
    """The most tokens a prompt of `problems` takes through `tokenizer`'s chat template."""
    return max(
        len(
            tokenizer.apply_chat_template(
                chat_messages(p, benchmark_of(name).kind, settings),
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        )
        for name, rows in problems.items()
        for p in limited(rows, settings)
    )


def limited(rows: list[Problem], settings: EvalSettings) -> list[Problem]:
    """The problems evaluated: the first `settings.limit`, or all."""
    return rows[: settings.limit] if settings.limit else rows


def run_benchmarks(
    lm,
    problems: dict[str, list[Problem]],
    settings: EvalSettings,
    count_tokens: Callable[[str], int],
) -> Evaluation:
    """Runs every benchmark of `problems` through lm-eval with the model `lm` (an lm_eval LM)."""
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    graded: dict[str, dict[int, list[tuple[str | None, bool, bool]]]] = {name: {} for name in problems}
    chosen = {name: limited(rows, settings) for name, rows in problems.items()}
    tasks = [_task(name, rows, settings, graded[name]) for name, rows in chosen.items()]
    outcome = simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=TaskManager(include_defaults=False),  # ours only: no index of lm-eval's own tasks
        apply_chat_template=True,
        system_instruction=settings.system_prompt,
        log_samples=True,
        bootstrap_iters=0,  # the standard error is computed here, over problems
        random_seed=settings.seed,
        numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
    )
    replies = {
        name: _replies(outcome["samples"][name], chosen[name], graded[name], settings, count_tokens)
        for name in chosen
    }
    scores = [
        _score(name, replies[name], settings, outcome["results"][name][f"pass@1,{_FILTER}"])
        for name in chosen
    ]
    return Evaluation(scores, replies, settings, lm_eval.__version__)


_FILTER = "samples"  # lm-eval's name for the filter that keeps every sample of a problem


def _task(name: str, rows: list[Problem], settings: EvalSettings, graded: dict) -> dict[str, Any]:
    """The lm-eval task config of one benchmark (a dict: lm-eval builds the task from it)."""
    from datasets import Dataset

    kind = benchmark_of(name).kind
    docs = [
        {"index": i, "id": p.id, "text": settings.user_turn(p.text, kind), "gold": p.gold}
        for i, p in enumerate(rows)
    ]

    def process_results(doc: dict, results: list[list[str]]) -> dict[str, float]:
        (replies,) = results
        graded[doc["index"]] = [grade(kind, reply, doc["gold"]) for reply in replies]
        return {"pass@1": sum(correct for _, correct, _ in graded[doc["index"]]) / len(replies)}

    return {
        "task": name,
        "custom_dataset": lambda **_: {"test": Dataset.from_list(docs)},
        "test_split": "test",
        "doc_to_text": _doc_text,
        "doc_to_target": _doc_gold,
        "output_type": "generate_until",
        "generation_kwargs": {
            "until": list(settings.stop),
            "do_sample": settings.temperature > 0,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_gen_toks": settings.max_new_tokens,
        },
        "repeats": settings.samples,
        "filter_list": [{"name": _FILTER, "filter": [{"function": "take_first_k", "k": settings.samples}]}],
        "process_results": process_results,
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
    }


def _doc_text(doc: dict) -> str:
    return doc["text"]


def _doc_gold(doc: dict) -> str:
    return doc["gold"]


def _replies(
    samples: list[dict], rows: list[Problem], graded: dict, settings, count_tokens
) -> list[GradedReply]:
    """Every reply of a benchmark with its grade, in problem order."""
    out = []
    for sample in sorted(samples, key=lambda s: s["doc"]["index"]):
        index = sample["doc"]["index"]
        prompt = sample["arguments"][0][0]
        for k, (reply, (answer, correct, unclosed)) in enumerate(
            zip(sample["filtered_resps"][0], graded[index], strict=True)
        ):
            tokens = count_tokens(reply)
            out.append(
                GradedReply(
                    problem_id=rows[index].id,
                    sample=k,
                    prompt=prompt,
                    reply=reply,
                    answer=answer,
                    gold=rows[index].gold,
                    correct=correct,
                    reply_tokens=tokens,
                    finish="length" if tokens >= settings.max_new_tokens else "stop",
                    thinking_unclosed=unclosed,
                )
            )
    return out


def _score(
    name: str, replies: list[GradedReply], settings: EvalSettings, harness_pass: float
) -> BenchmarkScore:
    by_problem: dict[str, list[GradedReply]] = {}
    for reply in replies:
        by_problem.setdefault(reply.problem_id, []).append(reply)
    per_problem = [sum(r.correct for r in rs) / len(rs) for rs in by_problem.values()]
    n = len(per_problem)
    return BenchmarkScore(
        name=name,
        title=benchmark_of(name).title,
        pass_at_1=sum(per_problem) / n,
        stderr=statistics.stdev(per_problem) / math.sqrt(n) if n > 1 else None,
        problems=n,
        samples_per_problem=settings.samples,
        hit_token_cap=sum(r.finish == "length" for r in replies) / len(replies),
        thinking_unclosed=sum(r.thinking_unclosed for r in replies) / len(replies),
        mean_reply_tokens=sum(r.reply_tokens for r in replies) / len(replies),
        harness_pass_at_1=harness_pass,
    )


def markdown_table(scores: list[BenchmarkScore]) -> str:
    """The scores beside the references' (docs/evaluation.md), in percent."""
    references = list(REFERENCES)
    lines = [
        "| benchmark | pass@1 (%) | ± s.e. | problems | samples | hit token cap (%) | mean reply tokens | "
        + " | ".join(references)
        + " |",
        "| --- |" + " ---: |" * (6 + len(references)),
    ]
    for s in scores:
        stderr = f"{100 * s.stderr:.1f}" if s.stderr is not None else "-"
        reported = [f"{REFERENCES[r][s.name]:.1f}" if s.name in REFERENCES[r] else "-" for r in references]
        lines.append(
            f"| {s.title} | {100 * s.pass_at_1:.1f} | {stderr} | {s.problems} | {s.samples_per_problem} | "
            f"{100 * s.hit_token_cap:.1f} | {s.mean_reply_tokens:.0f} | " + " | ".join(reported) + " |"
        )
    return "\n".join(lines) + "\n"


def plot_scores(scores: list[BenchmarkScore], out_png: Path, title: str) -> Path:
    """pass@1 per benchmark with its standard error, and the references' figures as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.6 * len(scores) + 3, 4))
    x = range(len(scores))
    axes.bar(
        x,
        [100 * s.pass_at_1 for s in scores],
        yerr=[100 * (s.stderr or 0) for s in scores],
        capsize=4,
        color="tab:blue",
        label="this run",
    )
    for marker, (reference, figures) in zip("D^", REFERENCES.items(), strict=False):
        shown = [(i, figures[s.name]) for i, s in enumerate(scores) if s.name in figures]
        if shown:
            axes.scatter(*zip(*shown, strict=True), marker=marker, color="black", zorder=3, label=reference)
    axes.set_xticks(list(x), [s.title for s in scores], rotation=20)
    axes.set_ylabel("pass@1 (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(out_png, dpi=100)
    plt.close(figure)
    return out_png


def write_outputs(evaluation: Evaluation, out: Path, about: dict[str, Any], force: bool = False) -> Path:
    """OUT/results.json (scores, settings, `about`: model, data, versions), OUT/samples/NAME.jsonl (every
    reply), OUT/results.md (the table) and OUT/results.png (the plot), both beside the references'
    figures; the directory appears whole or not at all."""
    with atomic_directory(out, force=force) as tmp:
        results = {
            "scores": {s.name: asdict(s) for s in evaluation.scores},
            "settings": asdict(evaluation.settings),
            "lm_eval_version": evaluation.lm_eval_version,
            **about,
        }
        (tmp / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        (tmp / "samples").mkdir()
        for name, replies in evaluation.replies.items():
            lines = (json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in replies)
            (tmp / "samples" / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
        (tmp / "results.md").write_text(markdown_table(evaluation.scores))
        plot_scores(
            evaluation.scores, tmp / "results.png", f"pass@1 ({evaluation.settings.profile or 'settings'})"
        )
    return out
