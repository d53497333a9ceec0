"""The result every verifier returns."""

from __future__ import annotations

from typing import NamedTuple


class RewardResult(NamedTuple):
    reward: float
    # Why: "correct", "wrong", "no_answer", "unparsable_answer", "timeout", "wrong_answer",
    # "time_limit", "memory_limit", "output_limit", "runtime_error", "no_code", "sandbox_error",
    # "error: <type>", ...
    reason: str
