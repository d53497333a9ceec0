"""Math answers: extract the final answer from a response and check it against the gold answer.

Plain numbers (the built-in arithmetic task) compare exactly in-process; everything else goes to
math-verify in a worker process with a per-call timeout (k15.reward.math_worker). Model output is
untrusted: nothing here raises on it; anything unparsable scores 0 with a reason.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation

from k15.reward.result import RewardResult

__all__ = ["RewardResult", "extract_answer", "last_boxed", "score_math", "score_math_many",
           "default_verifier", "MAX_ANSWER_CHARS"]

_BOX_COMMANDS = ("\\boxed", "\\fbox")
_ANSWER_LINE = re.compile(r"\banswer\s*(?:is\s*:?|:|=)\s*(.+)", re.IGNORECASE)
_HASH_ANSWER = re.compile(r"^\s*####\s*(.+)$")
_PLAIN_NUMBER = re.compile(r"[-+]?\d{1,200}(?:\.\d{1,200})?")
MAX_ANSWER_CHARS = 1000  # longer "answers" are not sent to the symbolic checker


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), nested braces balanced; None if none."""
    start, cmd = max((text.rfind(c + "{"), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    depth, i = 1, start + len(cmd) + 1
    for j in range(i, len(text)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def _clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    for left, right in (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if answer.startswith(left) and answer.endswith(right) and len(answer) >= len(left) + len(right):
            answer = answer[len(left) : len(answer) - len(right)].strip()
    return answer.rstrip(".").strip()


def extract_answer(response: str) -> str | None:
    """The final answer: the last \\boxed{} if any, else the last 'answer: ...' or '#### ...' line."""
    if not isinstance(response, str):
        return None
    boxed = last_boxed(response)
    if boxed is not None:
        return _clean(boxed)
    for line in reversed(response.strip().splitlines()):
        m = _HASH_ANSWER.match(line) or _ANSWER_LINE.search(line)
        if m:
            return _clean(m.group(1))
    return None


def _plain_equal(answer: str, gold: str) -> bool | None:
    """Exact comparison of plain decimal numbers; None when either is not one."""
    if not (_PLAIN_NUMBER.fullmatch(answer) and _PLAIN_NUMBER.fullmatch(gold)):
        return None
    try:
        return Decimal(answer) == Decimal(gold)
    except InvalidOperation:
        return None


_default = None
_default_lock = threading.Lock()


def default_verifier():
    """The process-wide math-verify worker (started on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            from k15.reward.math_worker import MathVerifier

            _default = MathVerifier()
        return _default


def _prepare(response, gold) -> tuple[RewardResult | None, str, str]:
    """Either a final result, or the (answer, gold) pair that needs the symbolic checker."""
    if not isinstance(gold, str) or not gold.strip():
        return RewardResult(0.0, "unparsable_gold"), "", ""
    answer = extract_answer(response)
    if not answer:
        return RewardResult(0.0, "no_answer"), "", ""
    gold = _clean(gold)
    same = _plain_equal(answer, gold)
    if same is not None:
        return RewardResult(1.0 if same else 0.0, "correct" if same else "wrong"), "", ""
    if len(answer) > MAX_ANSWER_CHARS:
        return RewardResult(0.0, "unparsable_answer"), "", ""
    return None, answer, gold


def score_math_many(pairs, verifier=None) -> list[RewardResult]:
    """Score [(response, gold), ...]; symbolic checks go to the worker in one pipelined batch."""
    out: list[RewardResult | None] = []
    todo: list[tuple[int, str, str]] = []
    for i, (response, gold) in enumerate(pairs):
        try:
            done, answer, g = _prepare(response, gold)
        except Exception as e:  # untrusted input: report, never crash the run
            done, answer, g = RewardResult(0.0, f"error: {type(e).__name__}"), "", ""
        out.append(done)
        if done is None:
            todo.append((i, g, answer))
    if todo:
        try:
            checked = (verifier or default_verifier()).verify_many([(g, a) for _, g, a in todo])
        except Exception as e:  # the worker cannot start: every pending answer gets the reason
            checked = [(False, f"error: {type(e).__name__}: {e}")] * len(todo)
        for (i, _, _), (same, why) in zip(todo, checked):
            out[i] = RewardResult(1.0 if same else 0.0, why)
    return out  # type: ignore[return-value]


def score_math(response: str, gold: str, verifier=None) -> RewardResult:
    """1.0 if the response's final answer equals `gold`, else 0.0 with the reason; never raises."""
    return score_math_many([(response, gold)], verifier)[0]
