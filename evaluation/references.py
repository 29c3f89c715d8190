"""What the references report for this recipe's SFT model, per benchmark (pass@1, %), shown beside a
run's scores in its table and plot. Sources and settings: docs/evaluation.md.

    REFERENCES["AM SFT"]["aime24"]     # 84.3
"""

from __future__ import annotations

REFERENCES: dict[str, dict[str, float]] = {
    # K2-Think report (arXiv 2509.07604): the SFT checkpoint before RL, where pass@1 levels off in training
    "K2-Think SFT": {"aime24": 79.3, "aime25": 72.1},
    # "Not All Correct Answers Are Equal" (arXiv 2505.14464): Qwen2.5-32B SFT on AM-Thinking-v1-Distilled
    "AM SFT": {"aime24": 84.3, "aime25": 72.2, "math500": 98.4},
}
