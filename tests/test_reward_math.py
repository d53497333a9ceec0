"""Math verification: extraction, equivalence through math-verify, the per-call timeout, reasons."""

from __future__ import annotations

import threading
import time

import pytest

from k15.reward.math import extract_answer, last_boxed, score_math, score_math_many
from k15.reward.math_worker import MathVerifier


@pytest.fixture(scope="module")
def verifier():
    v = MathVerifier(timeout_s=1.0)
    yield v
    v.close()


@pytest.mark.parametrize("response, expected", [
    ("so it is \\boxed{14}.", "14"),
    ("first \\boxed{1} then \\boxed{\\frac{3}{4}} done", "\\frac{3}{4}"),
    ("nested \\boxed{\\sqrt{\\frac{1}{2}}}", "\\sqrt{\\frac{1}{2}}"),
    ("\\fbox{7}", "7"),
    ("work...\nThe final answer is: $42$.", "42"),
    ("blah\nAnswer: 3/4", "3/4"),
    ("steps\n#### 1,234", "1,234"),
    ("no answer here", None),
    ("The answer is 5", "5"),
    ("unbalanced \\boxed{12", None),
    ("", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_last_boxed_takes_the_last_of_both_commands():
    assert last_boxed("\\fbox{1} and \\boxed{2}") == "2"
    assert last_boxed("\\boxed{1} and \\fbox{2}") == "2"


def test_plain_numbers_compare_exactly_without_the_worker():
    v = MathVerifier(timeout_s=1.0)  # never started: the fast path must not need it
    assert score_math("The answer is \\boxed{14}.", "14", verifier=v).reason == "correct"
    assert score_math("\\boxed{14.0}", "14", verifier=v).reward == 1.0
    assert score_math("\\boxed{15}", "14", verifier=v).reason == "wrong"
    # floats would call these equal (both overflow to inf); exact decimals do not
    assert score_math("\\boxed{" + "9" * 200 + "}", "9" * 199 + "8", verifier=v).reward == 0.0
    assert v._proc is None


@pytest.mark.parametrize("response, gold, reward", [
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac12", 1.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("\\boxed{x^2}", "x^3", 0.0),
])
def test_symbolic_equivalence(verifier, response, gold, reward):
    r = score_math(response, gold, verifier=verifier)
    assert r.reward == reward, r


def test_unparsable_and_missing_answers_score_zero_with_a_reason(verifier):
    assert score_math("I don't know", "3", verifier=verifier).reason == "no_answer"
    assert score_math("\\boxed{}", "3", verifier=verifier).reason == "no_answer"
    assert score_math("\\boxed{3}", "", verifier=verifier).reason == "unparsable_gold"
    assert score_math("\\boxed{" + "x+" * 600 + "x}", "3", verifier=verifier).reason == "unparsable_answer"
    r = score_math("\\boxed{\\frac{}{}}", "3", verifier=verifier)
    assert r.reward == 0.0 and r.reason in ("unparsable_answer", "wrong")
    assert score_math(None, "3", verifier=verifier).reason == "no_answer"


def test_timeout_holds_and_the_worker_recovers(verifier):
    start = time.monotonic()
    r = score_math("\\boxed{9^{9^{9^{9^{9}}}}}", "2", verifier=verifier)
    assert r == type(r)(0.0, "timeout")
    assert time.monotonic() - start < verifier.timeout_s + 5.0
    # the next answers are checked normally (by a restarted worker if the old one was stuck)
    assert score_math("\\boxed{\\frac{1}{2}}", "0.5", verifier=verifier).reward == 1.0


def test_batch_keeps_order_around_a_timeout(verifier):
    pairs = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{9^{9^{9^{9^{9}}}}}", "2"), ("\\boxed{\\frac{1}{3}}", "0.5"),
             ("\\boxed{2}", "2"), ("\\boxed{\\pi}", "\\pi")]
    assert [r.reason for r in score_math_many(pairs, verifier=verifier)] == [
        "correct", "timeout", "wrong", "correct", "correct"]


def test_works_outside_the_main_thread(verifier):
    """math-verify's own signal.alarm would fail here; the worker process does not care."""
    out = []
    t = threading.Thread(target=lambda: out.append(score_math("\\boxed{\\frac{6}{8}}", "3/4", verifier=verifier)))
    t.start()
    t.join()
    assert out and out[0].reward == 1.0


def test_worker_is_confined():
    """Memory cap, no file writes, and (with libseccomp) the sandbox's syscall filter."""
    from k15.reward.seccomp import filter_bytes

    v = MathVerifier(timeout_s=1.0, memory_mb=300)
    try:
        assert score_math("\\boxed{\\frac{1}{2}}", "0.5", verifier=v).reward == 1.0
        limits = open(f"/proc/{v._proc.pid}/limits").read().splitlines()
        address = next(line for line in limits if line.startswith("Max address space"))
        assert address.split()[3] == str(300 * 2**20), address
        size = next(line for line in limits if line.startswith("Max file size"))
        assert size.split()[3] == "0", size
        status = dict(line.split(":\t", 1) for line in open(f"/proc/{v._proc.pid}/status").read().splitlines()
                      if ":\t" in line)
        if filter_bytes() is not None:
            assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1", status
    finally:
        v.close()


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        MathVerifier(memory_mb=-1)


def test_a_hung_worker_cannot_block_a_large_batch():
    """The worker hangs (stopped outright, as in a C-level computation no timer can interrupt) while
    the batch is bigger than a pipe buffer: the host must neither block on its write nor lose the
    other answers."""
    import os
    import signal

    v = MathVerifier(timeout_s=0.5)
    assert v.verify("1", "1") == (True, "correct")
    stopped = v._proc.pid
    try:
        os.kill(stopped, signal.SIGSTOP)
        long_half = "\\frac{1}{2}" + "\\," * 450  # 911 characters of thin spaces, equals 1/2
        pairs = [("\\boxed{\\frac{1}{2}}", "0.5")] + [("\\boxed{" + long_half + "}", "0.5")] * 100
        out = []
        t = threading.Thread(target=lambda: out.append(score_math_many(pairs, verifier=v)), daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "verify_many blocked on a hung worker"
        results = out[0]
        assert results[0].reason == "timeout" and v.restarts == 1
        assert len(results) == 101 and all(r.reason == "correct" for r in results[1:]), results[:3]
    finally:
        try:
            os.kill(stopped, signal.SIGKILL)  # unblocks a blocked writer, so close() can take the lock
        except ProcessLookupError:
            pass
        v.close()
