"""The one exception root for problems that are the user's to fix.

Everything raised for a bad configuration, bad data, a bad checkpoint, an unsupported model or a bad
command-line input derives from `UserError`, and its message names the file, tensor or field and the
fix. Entry points report a `UserError` as one `error: ...` line with exit status 2
(`common.cli.exit_status`); any other exception is a bug or an environment failure and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class UserError(Exception):
    """A problem with what the user gave us; the message says what is wrong and how to fix it."""


class InputError(UserError):
    """A command-line input: a missing input path, an existing output without --force, a bad value."""


class ConfigError(UserError):
    """The trainer configuration is invalid; the message names the field and the fix."""

    @classmethod
    def listing(cls, problems: Sequence[str]) -> ConfigError:
        """One error for every problem found, one per line (a user fixes them all in one go)."""
        return cls("invalid configuration:\n  - " + "\n  - ".join(problems))


class DataError(UserError):
    """Packed data is missing, inconsistent or does not fit the run; the message names the file."""


class CheckpointError(UserError):
    """A checkpoint (Hugging Face or torch_dist) is missing, damaged, or does not hold the expected model."""


class UnsupportedModelError(UserError):
    """The HF config describes something the model definition cannot represent exactly."""
