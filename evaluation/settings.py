"""Evaluation settings: a profile of configs/eval/ (or any YAML file of the same keys), with the
command line's overrides, validated before a model is loaded.

    settings = load_profile("k2think").with_overrides(samples=4, max_new_tokens=2048)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.errors import InputError

PROFILE_DIR = Path(__file__).resolve().parents[1] / "configs" / "eval"


@dataclass(frozen=True)
class EvalSettings:
    temperature: float  # 0: greedy
    top_p: float
    max_new_tokens: int  # the token cap of one reply
    samples: int  # replies per problem; pass@1 is their mean
    stop: tuple[str, ...] = ()  # a reply ends at the first of these (and at the end-of-turn token)
    suffix: str = ""  # after each math problem, on its own line, in the user turn
    choice_suffix: str = ""  # after each multiple-choice question and its options
    seed: int = 0  # sampling, and GPQA's option order
    limit: int | None = None  # the first N problems of each benchmark only
    system_prompt: str | None = None  # None: the chat template's own default (the trained one)
    profile: str = ""  # where the settings came from

    def with_overrides(self, **overrides) -> EvalSettings:
        """These settings with every override that is not None."""
        given = {key: value for key, value in overrides.items() if value is not None}
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        return dataclasses.replace(self, **given)

    def problems(self) -> list[str]:
        checks = [
            (self.samples >= 1, f"samples is {self.samples}: at least 1 reply per problem"),
            (self.max_new_tokens >= 1, f"max_new_tokens is {self.max_new_tokens}: at least 1"),
            (self.temperature >= 0, f"temperature is {self.temperature}: 0 (greedy) or more"),
            (0 < self.top_p <= 1, f"top_p is {self.top_p}: in (0, 1]"),
            (self.limit is None or self.limit >= 1, f"limit is {self.limit}: at least 1 problem"),
        ]
        return [message for ok, message in checks if not ok]

    def validated(self) -> EvalSettings:
        problems = self.problems()
        if problems:
            raise InputError("invalid evaluation settings (" + self.profile + "): " + "; ".join(problems))
        return self

    def user_turn(self, problem_text: str, kind: str) -> str:
        """The problem as the user turn: the text, then the profile's suffix for its kind."""
        suffix = self.choice_suffix if kind == "choice" else self.suffix
        return f"{problem_text}\n{suffix}" if suffix else problem_text


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def load_profile(name_or_path: str) -> EvalSettings:
    """A profile by name (configs/eval/NAME.yaml) or a YAML file of the same keys."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InputError(
            f"no evaluation profile {name_or_path!r}; the profiles are: {', '.join(profile_names())}"
        )
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(EvalSettings)} - {"profile"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(
            f"{path}: unknown key(s) {', '.join(unknown)}; the keys are: {', '.join(sorted(known))}"
        )
    missing = [
        f.name
        for f in dataclasses.fields(EvalSettings)
        if f.default is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        raise InputError(f"{path}: missing key(s) {', '.join(missing)}")
    values["stop"] = tuple(values.get("stop") or ())
    return EvalSettings(**values, profile=str(path))
