"""Math answers: extract the final answer from a response and check it with math-verify.

Model output is untrusted: `score` never raises on it; anything unparsable scores 0 with a reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOXED = "\\boxed{"
_ANSWER_LINE = re.compile(r"(?:final answer|the answer is|answer)\s*[:=]?\s*(.+)", re.IGNORECASE)
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass(frozen=True)
class RewardResult:
    reward: float
    reason: str  # "correct", "wrong", "no_answer", "unparsable", "error: ..."


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, with nested braces balanced; None if there is none."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer: the last \\boxed{} if any, else the last 'answer: ...' line."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed.strip()
    for line in reversed(response.strip().splitlines()):
        m = _ANSWER_LINE.search(line)
        if m:
            return m.group(1).strip().rstrip(".")
    return None


def _verify_with_math_verify(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    # math-verify's own timeouts use signal.alarm, which fails outside the main thread (Ray actors):
    # switch them off here; the caller bounds the time.
    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    answer_parsed = parse(f"${answer}$", parsing_timeout=None)
    if not gold_parsed or not answer_parsed:
        return False
    return bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))


def score_math(response: str, gold: str) -> RewardResult:
    """1.0 if the response's final answer equals `gold`, else 0.0; never raises."""
    try:
        answer = extract_answer(response)
        if answer is None or not answer:
            return RewardResult(0.0, "no_answer")
        # Fast path: plain numbers compare exactly without the symbolic machinery.
        if _PLAIN_NUMBER.fullmatch(answer) and _PLAIN_NUMBER.fullmatch(gold.strip()):
            same = float(answer) == float(gold)
            return RewardResult(1.0 if same else 0.0, "correct" if same else "wrong")
        same = _verify_with_math_verify(gold, answer)
        return RewardResult(1.0 if same else 0.0, "correct" if same else "wrong")
    except Exception as e:  # untrusted input: report, never crash the run
        return RewardResult(0.0, f"error: {type(e).__name__}")
