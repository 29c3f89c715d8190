"""The evaluation stage: scores of a release on the reasoning benchmarks K2-Think reports
(`tools/evaluate.py`), through lm-evaluation-harness.

- `benchmarks`: the benchmarks and reading their problems from a data directory (the hub's columns);
- `settings`: the evaluation profiles of configs/eval/ (sampling, token cap, samples, suffix), validated;
- `harness`: each benchmark as an lm-eval generation task, run, graded, scored and written out;
- `grading`: the final answer of a reply (after the thinking, inside <answer> or \\boxed{}) and whether
  it equals the gold answer (math-verify), or is the right option letter.

Depends on `common/` only; see docs/architecture.md.
"""
