"""The evaluation stage: scores of a release on the reasoning benchmarks K2-Think reports.

- `grading`: the final answer of a reply (after the thinking, inside <answer> or \\boxed{}) and whether
  it equals the gold answer (math-verify), or is the right option letter.

Depends on `common/` only; see docs/architecture.md.
"""
