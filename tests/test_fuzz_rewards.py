"""Fuzz: random and adversarial strings through the math and code verifiers; no exception escapes.

10,000+ strings go through each verifier's entry point (deterministic seeds, so a failure
reproduces). Most fuzzed code responses have no fenced block and stop at extraction; the ones
that do carry code (several hundred) run in the sandbox. Fuzz also reaches the other untrusted
inputs: test specs (`answer`), test inputs crossing into the sandbox, and a garbage byte stream
where the host expects the loader's replies.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from k15.reward.code import parse_code_tests, score_code
from k15.reward.math import score_math_many
from k15.reward.math_worker import MathVerifier
from k15.reward.result import RewardResult
from k15.reward.sandbox import Limits, Sandbox, SandboxConfig, _Closed, _Container, _Timeout, bwrap_path

N = 10_000
LIMITS = Limits(cpu_s=1, wall_s=1.0, memory_mb=256, processes=8, file_mb=4, output_kb=64)
ALPHABET = (
    "0123456789+-*/^=.,:;!?()[]{}<>|\\$%&#@_~'\" \n\t\r"
    "abcxyzABCXYZ\u00e9\u03c0\u221e\u00bd\u0663\uff13\u202e\u200b\U0001f600\x00\x07\x1b\ud800\udfff"
)
LATEX = ["\\frac", "\\sqrt", "\\boxed", "\\fbox", "\\left(", "\\right)", "\\pi", "\\infty", "\\cdot", "\\begin{pmatrix}",
         "\\end{pmatrix}", "\\text{", "\\mathrm{", "^{", "_{", "\\\\", "&", "\\{", "\\}", "\\le", "\\in", "\\cup", "%", "\\%"]
GOLDS = ["3", "-7", "0.5", "\\frac{1}{2}", "x^2+1", "\\sqrt{2}", "\\{1,2\\}", "10\\%", "(1,2)", "\\pi", "1,000", ""]


def rand_text(rng: random.Random, max_len: int) -> str:
    n = rng.randint(0, max_len)
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def rand_latex(rng: random.Random) -> str:
    parts = [rng.choice(LATEX) if rng.random() < 0.4 else rand_text(rng, 6) for _ in range(rng.randint(1, 25))]
    return "".join(parts)


def math_responses(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    fixed = [  # hand-made adversarial cases
        "\\boxed{" * 5000, "}" * 5000 + "\\boxed{1}", "\\boxed{" + "{" * 3000 + "}" * 3000 + "}",
        "\\boxed{9^{9^{9^{9}}}}", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}", "\\boxed{" + "9" * 5000 + "}",
        "\\boxed{1e999999}", "\\boxed{nan}", "\\boxed{inf}", "\\boxed{-0}", "\\boxed{\u0663}", "\\boxed{\uff13}",
        "\\boxed{\\frac{" * 200 + "1" + "}{2}" * 200 + "}", "answer: " + " " * 100000, "#### " + "1" * 100000,
        "\\boxed{" + "x+" * 5000 + "x}", "x" * 1_000_000, "\\boxed{\ud800}", "\\boxed{\x00}", "The answer is \\(",
        "\\boxed{\\begin{pmatrix}" + "1&" * 500 + "1\\end{pmatrix}}", "\\boxed{(x+1)^{3000}}",
    ]
    out = list(fixed)
    while len(out) < n:
        kind = rng.random()
        if kind < 0.3:
            out.append(rand_text(rng, 200))
        elif kind < 0.6:
            out.append(rand_text(rng, 40) + "\\boxed{" + rand_latex(rng) + "}" + rand_text(rng, 5))
        elif kind < 0.75:
            out.append(rand_text(rng, 40) + "\nThe answer is " + rand_latex(rng))
        elif kind < 0.85:
            out.append("\\boxed{" + str(rng.randint(-10**6, 10**6)) + "}")
        else:
            out.append("\\boxed{" + rng.choice(GOLDS) + "}" if rng.random() < 0.5 else rand_latex(rng))
    return out[:n]


def code_responses(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    snippets = ["print(", "import os", "while True:", "    pass", "x = ", "input()", "1/0", "exit()", "yield", "lambda",
                "def f(", "):", "import sys; sys.stdout.write", "'\\x00'", "\"\"\"", "#", "\\", "\t", "try:", "except:"]
    fixed = [
        "```python\n" + "(" * 1000 + ")" * 1000 + "\n```", "```python\n" + "x=1\n" * 20000 + "```",
        "```python\nprint('\ud800')\n```", "```python\x00\nprint(1)\n```", "```" * 3000, "```python\n```python\n```",
        "```python\nimport sys\nsys.setrecursionlimit(10**6)\ndef f(n): return f(n+1)\nf(0)\n```",
        "```python\nprint('a' * 10**7)\n```", "```python\nimport os\nos.write(1, bytes(range(256)) * 1000)\n```",
        "```python\n" + "\u202e" * 1000 + "\n```", "```python\nraise SystemExit('\\x00' * 100)\n```",
        "```python\nimport signal, os\nos.kill(os.getpid(), signal.SIGSEGV)\n```",
    ]
    out = list(fixed)
    while len(out) < n:
        kind = rng.random()
        if kind < 0.96:  # prose, maybe with broken fences: never reaches the sandbox
            body = rand_text(rng, 300)
            if rng.random() < 0.3:
                body += "``" + rand_text(rng, 20)
            if rng.random() < 0.2:
                body = "```" + rand_text(rng, 10)  # unterminated fence
            out.append(body)
        else:  # a fenced program of random lines (mostly syntax errors, some run)
            lines = [rng.choice(snippets) + (rand_text(rng, 10) if rng.random() < 0.5 else "") for _ in range(rng.randint(1, 8))]
            if rng.random() < 0.3:
                lines = ["print(input())"]
            out.append(f"{rand_text(rng, 20)}```{rng.choice(['python', 'py', '', 'c++'])}\n" + "\n".join(lines) + "\n```")
    return out[:n]


def _check(results, n):
    assert len(results) == n
    for r in results:
        assert isinstance(r, RewardResult) and r.reward in (0.0, 1.0) and isinstance(r.reason, str) and r.reason


def test_fuzz_math_verifier():
    responses = math_responses(seed=1, n=N)
    rng = random.Random(2)
    pairs = [(r, rng.choice(GOLDS) if rng.random() < 0.9 else rand_latex(rng)) for r in responses]
    v = MathVerifier(timeout_s=1.0, memory_mb=1024)
    try:
        results = score_math_many(pairs, verifier=v)
    finally:
        v.close()
    _check(results, N)
    reasons = {r.reason for r in results}
    assert {"no_answer", "wrong", "correct"} <= reasons, reasons  # the fuzz reached the checker


@pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
def test_fuzz_code_verifier():
    from concurrent.futures import ThreadPoolExecutor

    spec = parse_code_tests(json.dumps({"tests": [{"input": "fuzz\n", "output": "fuzz\n"}], "limits": LIMITS.__dict__}))
    responses = code_responses(seed=3, n=N)
    with Sandbox(SandboxConfig(prestart=2, limits=LIMITS)) as sb:
        with ThreadPoolExecutor(2) as ex:
            results = list(ex.map(lambda r: score_code(r, spec, sandbox=sb), responses))
    _check(results, N)
    ran = sum(r.reason not in ("no_code", "code_too_long") for r in results)
    assert ran >= 300, ran  # that many fuzzed programs really ran in the sandbox
    assert any(r.reward == 1.0 for r in results)  # `print(input())` passes: the path works
    assert not any(r.reason.startswith("error") for r in results), {r.reason for r in results}


def test_fuzz_test_specs_only_raise_value_error():
    rng = random.Random(4)
    pieces = ['{"tests": ', '[', ']', '{', '}', '"input": ', '"output": ', '"args": ', '"fn_name": ', '"style": ',
              '"call"', '"stdio"', '"limits": ', '"cpu_s": ', '-1', '1e999', 'null', 'true', '"x"', ',', ':', '0']
    ok = 0
    for i in range(N):
        if i % 3 == 0:
            text = rand_text(rng, 60)
        else:
            text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        try:
            parse_code_tests(text)
            ok += 1
        except ValueError:
            pass
    parse_code_tests('{"tests": [{"input": "", "output": ""}]}')
    with pytest.raises(ValueError):
        parse_code_tests("[" * 100000)


@pytest.mark.skipif(bwrap_path() is None, reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
def test_fuzz_inputs_cross_into_the_sandbox():
    """Fuzzed stdin round-trips through an echo program (lone surrogates come back replaced)."""
    rng = random.Random(5)
    inputs = [rand_text(rng, 300) for _ in range(200)] + ["\x00" * 1000, "\ud800", "x" * 200_000]
    echo = "import sys\nsys.stdout.write(sys.stdin.read())"
    with Sandbox(SandboxConfig(prestart=1, limits=LIMITS)) as sb:
        runs = sb.run(echo, [{"input": x} for x in inputs]).tests
    assert len(runs) == len(inputs)
    for x, r in zip(inputs, runs):
        assert r.status == "exited" and r.exit_code == 0, r
        if x == "x" * 200_000:
            assert r.stdout_bytes == 200_000 and len(r.stdout) == LIMITS.output_kb * 1024
        else:  # JSON pairs up adjacent surrogates; lone ones cannot cross as UTF-8 (they become "?");
            # stdin reads universal newlines
            expected = json.loads(json.dumps(x)).encode("utf-8", "replace").decode("utf-8")
            assert r.stdout == expected.replace("\r\n", "\n").replace("\r", "\n")


def test_fuzz_garbage_where_loader_replies_are_expected():
    """The host's reader gets random bytes instead of the loader's frames: it raises only its own
    errors (timeout, closed, ValueError for a malformed frame) and never blocks past its deadline."""
    import time

    rng = random.Random(6)
    streams = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))) for _ in range(300)]
    streams += [b"\x00\x00\x00\x05[[[[[", b"\x00\x10\x00\x00" + b"x" * 100, b"\x00\x00\x00\x02{}",
                b"\x00\x01\x86\xa0" + b"[" * 100000]
    for data in streams:
        proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        c = _Container(proc)
        os.set_blocking(proc.stdin.fileno(), True)
        proc.stdin.write(data)  # cat echoes the garbage where the loader's frames should be
        proc.stdin.close()
        start = time.monotonic()
        try:
            for _ in range(4):
                c.recv(time.monotonic() + 0.2, max_bytes=65536)
        except (_Timeout, _Closed, ValueError):
            pass
        finally:
            c.kill()
        assert time.monotonic() - start < 2.0
