"""An lm-evaluation-harness model that returns fixed replies, for testing the evaluation stage through
the real harness without a model: each problem (by its id) gets its replies in order, one per sample.

    lm = ScriptedLM({"p1": ["<think>..</think> \\\\boxed{2}", "<think>..</think> \\\\boxed{3}"]})

Its chat template renders each turn as `[role] content` on its own line, so that a test can read the
prompt the harness built; every request it saw is kept in `requests` as (prompt, generation kwargs).
"""

from __future__ import annotations

from lm_eval.api.model import LM


class ScriptedLM(LM):
    def __init__(self, replies: dict[str, list[str]]):
        super().__init__()
        self._replies = {problem: list(texts) for problem, texts in replies.items()}
        self.requests: list[tuple[str, dict]] = []

    def generate_until(self, requests) -> list[str]:
        out = []
        for request in requests:
            prompt, generation_kwargs = request.args
            self.requests.append((prompt, generation_kwargs))
            out.append(self._replies[request.doc["id"]].pop(0))
        return out

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return "".join(f"[{turn['role']}] {turn['content']}\n" for turn in chat_history) + "[assistant] "

    @property
    def tokenizer_name(self) -> str:
        return "scripted"

    def loglikelihood(self, requests):
        raise NotImplementedError("the scripted model only generates")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("the scripted model only generates")
