"""The result every verifier returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardResult:
    reward: float
    # Why: "correct", "wrong", "no_answer", "unparsable_answer", "timeout", "wrong_answer",
    # "time_limit", "runtime_error", "no_code", "sandbox_error", "error: <type>", ...
    reason: str

