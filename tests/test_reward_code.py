"""Code verification: test specs, code extraction, output comparison, and scoring in the sandbox."""

from __future__ import annotations

import json
import statistics
import time

import pytest

from k15.reward.code import (extract_code, parse_code_tests, run_tests, score_code, stdout_matches,
                             value_matches)
from k15.reward.sandbox import Limits, Sandbox, SandboxConfig, SandboxUnavailable, TestRun, bwrap_path

needs_bwrap = pytest.mark.skipif(
    bwrap_path() is None, reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
)
FAST = Limits(cpu_s=1, wall_s=1.5, memory_mb=256, processes=8, file_mb=4, output_kb=64)


@pytest.fixture(scope="module")
def sandbox():
    if bwrap_path() is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    sb = Sandbox(SandboxConfig(prestart=2, limits=FAST))
    yield sb
    sb.close()


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


ADD_TESTS = json.dumps({"tests": [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4\n", "output": "6\n"},
                                  {"input": "0 0", "output": "0"}], "limits": FAST.__dict__})


# -- specs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, field", [
    ("not json", "answer"),
    ("[1, 2]", "answer"),
    ('{"tests": []}', "tests"),
    ('{"tests": [{"input": "1"}]}', "tests[0].output"),
    ('{"tests": [{"input": 1, "output": "1"}]}', "tests[0].input"),
    ('{"tests": [{"input": "1", "output": 1}]}', "tests[0].output"),
    ('{"style": "call", "tests": [{"args": [1], "output": 1}]}', "fn_name"),
    ('{"style": "call", "fn_name": "f", "tests": [{"args": 1, "output": 1}]}', "tests[0].args"),
    ('{"style": "call", "fn_name": "f", "tests": [{"kwargs": [], "output": 1}]}', "tests[0].kwargs"),
    ('{"style": "shell", "tests": [{"input": "", "output": ""}]}', "style"),
    ('{"compare": "fuzzy", "tests": [{"input": "", "output": ""}]}', "compare"),
    ('{"limits": {"cpu_s": -1}, "tests": [{"input": "", "output": ""}]}', "cpu_s"),
    ('{"limits": {"gpu": 1}, "tests": [{"input": "", "output": ""}]}', "gpu"),
    ('{"inputs": ["1"], "outputs": []}', "inputs"),
])
def test_bad_specs_name_the_field(answer, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        parse_code_tests(answer)


def test_apps_style_specs_are_understood():
    stdio = parse_code_tests('{"inputs": ["1\\n"], "outputs": ["2\\n"]}')
    assert stdio.style == "stdio" and stdio.tests == ({"input": "1\n", "output": "2\n"},)
    call = parse_code_tests('{"fn_name": "f", "inputs": [[1, 2]], "outputs": [3]}')
    assert call.style == "call" and call.tests[0]["args"] == [1, 2] and call.fn_name == "f"


def test_extract_code_prefers_the_last_python_block():
    text = "```text\nnot code\n```\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```\n```\nraw\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("no fences") is None
    assert extract_code("```python\n   \n```") is None
    assert extract_code("```python\nprint(1)") is None  # unterminated


def test_output_comparison():
    assert stdout_matches("3\n", "3")
    assert stdout_matches("1  2\n3\n\n", "1 2 3")
    assert not stdout_matches("1 2", "1 2 3")
    assert stdout_matches("0.3333333", "0.333333333", tol=1e-6)
    assert not stdout_matches("0.34", "0.333333333", tol=1e-6)
    assert not stdout_matches("nan", "nan.0")
    assert stdout_matches("a b\n", "a b", compare="lines")
    assert not stdout_matches("a\nb", "a b", compare="lines")
    assert not stdout_matches("3\n", "3", compare="exact")
    assert value_matches([1, [2, 3]], (1, (2, 3)))
    assert value_matches(0.1 + 0.2, 0.3)
    assert not value_matches(True, 1) and not value_matches(1, True)
    assert not value_matches({"a": 1}, {"a": 1, "b": 2})
    assert not value_matches("1", 1)


# -- scoring in the sandbox --------------------------------------------------------------------
@needs_bwrap
def test_correct_stdio_program_scores_one(sandbox):
    code = "a, b = map(int, input().split())\nprint(a + b)"
    assert score_code(fenced(code), ADD_TESTS, sandbox=sandbox) == (1.0, "correct")


@needs_bwrap
@pytest.mark.parametrize("code, reason", [
    ("print(3)", "wrong_answer"),
    ("raise ValueError('no')", "runtime_error"),
    ("import sys; sys.exit(2)", "runtime_error"),
    ("while True: pass", "time_limit"),
    ("import time; time.sleep(60)", "time_limit"),
    ("x = bytearray(1 << 30)", "memory_limit"),
    ("import sys\nwhile True: sys.stdout.write('x' * 65536)", "output_limit"),
    ("print(", "runtime_error"),
])
def test_failing_programs_score_zero_with_the_reason(sandbox, code, reason):
    assert score_code(fenced(code), ADD_TESTS, sandbox=sandbox) == (0.0, reason)


@needs_bwrap
def test_missing_code_scores_zero(sandbox):
    assert score_code("I would add the numbers.", ADD_TESTS, sandbox=sandbox) == (0.0, "no_code")


@needs_bwrap
def test_function_call_style(sandbox):
    spec = json.dumps({"style": "call", "fn_name": "pairs", "limits": FAST.__dict__, "tests": [
        {"args": [[3, 1, 2]], "output": [[1, 2], [2, 3]]},
        {"args": [[]], "kwargs": {"reverse": True}, "output": []},
    ]})
    good = "def pairs(xs, reverse=False):\n    s = sorted(xs, reverse=reverse)\n    return [(a, b) for a, b in zip(s, s[1:])]"
    assert score_code(fenced(good), spec, sandbox=sandbox).reward == 1.0
    leetcode = "class Solution:\n    def pairs(self, xs, reverse=False):\n        s = sorted(xs)\n        return list(zip(s, s[1:]))"
    assert score_code(fenced(leetcode), spec, sandbox=sandbox).reward == 1.0
    assert score_code(fenced("def pairs(xs, reverse=False):\n    return []"), spec, sandbox=sandbox).reason == "wrong_answer"
    assert score_code(fenced("def other(xs):\n    return []"), spec, sandbox=sandbox).reason == "runtime_error"
    # printing the expected value is not returning it
    assert score_code(fenced("def pairs(xs, reverse=False):\n    print([[1, 2], [2, 3]])"), spec,
                      sandbox=sandbox).reason == "wrong_answer"


@needs_bwrap
def test_stops_at_the_first_failure(sandbox):
    spec = parse_code_tests(json.dumps({"limits": FAST.__dict__, "tests": [{"input": str(i), "output": "x"} for i in range(20)]}))
    start = time.monotonic()
    passed, reason, runs = run_tests("import time; time.sleep(60)", spec, sandbox)
    assert (passed, reason, len(runs)) == (False, "time_limit", 1)
    assert time.monotonic() - start < 10 * FAST.wall_s


@needs_bwrap
def test_total_wall_budget_ends_slow_programs(sandbox):
    spec = parse_code_tests(json.dumps({"limits": FAST.__dict__, "max_total_s": 1.0,
                                        "tests": [{"input": "", "output": "ok"} for _ in range(10)]}))
    passed, reason, runs = run_tests("import time; time.sleep(0.4); print('ok')", spec, sandbox)
    assert (passed, reason) == (False, "time_limit") and len(runs) < 10


@needs_bwrap
def test_expected_outputs_never_enter_the_sandbox(sandbox):
    """A program that searches its objects and the loader's frames for the expected output cannot find
    it (the same probe does find a marker placed in the test's input)."""
    marker = "k15-expected-7f3a9c"
    spec = json.dumps({"limits": FAST.__dict__, "tests": [{"input": "probe", "output": marker}]})
    code = (
        "import gc, sys\n"
        "m = ''.join(['k15-expected-', '7f3a9c'])  # built at run time: not a constant of this code\n"
        "g = globals()  # holds m itself\n"
        "seen = [o for o in gc.get_objects() if isinstance(o, (dict, list, tuple)) and o is not g and o is not sys.modules]\n"
        "f = sys._getframe().f_back  # and the loader's frames: untracked dicts of strings hide from gc\n"
        "while f is not None:\n"
        "    seen.append(dict(f.f_locals)); f = f.f_back\n"
        "hits = [1 for o in seen if m in repr(o)]\n"
        "print('found' if hits else 'absent', file=sys.stderr)\n"
        "print(m if hits else 'absent')\n"
    )
    passed, reason, runs = run_tests(code, parse_code_tests(spec), sandbox)
    assert runs[0].stderr.strip().endswith("absent") and not passed
    control = sandbox.run(code, [{"input": "probe " + marker}]).tests[0]
    assert control.stdout.strip() == marker


@needs_bwrap
def test_tests_run_in_isolation_from_each_other(sandbox):
    """A daemon left by test 1 is gone by test 2; files written by test 1 are not in test 2's cwd."""
    code = (
        "import os, sys\n"
        "n = input().strip()\n"
        "if n == '1':\n"
        "    if os.fork() == 0:\n"
        "        os.setsid(); import time; time.sleep(30)\n"
        "    open('mark', 'w').write('x')\n"
        "    print('ok')\n"
        "else:\n"
        "    procs = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "    print('ok' if len(procs) == 2 and not os.path.exists('mark') else f'leak {procs}')\n"
    )
    spec = json.dumps({"limits": FAST.__dict__, "tests": [{"input": "1", "output": "ok"}, {"input": "2", "output": "ok"}]})
    assert score_code(fenced(code), spec, sandbox=sandbox) == (1.0, "correct")


@needs_bwrap
def test_process_limit_counts_threads(sandbox):
    code = (
        "import threading, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(10):\n"
        "        threading.Thread(target=time.sleep, args=(5,), daemon=True).start(); n += 1\n"
        "except RuntimeError:\n"
        "    pass\n"
        "print(n)\n"
    )
    for processes in (2, 4):
        run = sandbox.run(code, [{"input": ""}], limits=Limits(**{**FAST.__dict__, "processes": processes})).tests[0]
        assert run.stdout.strip() == str(processes - 1), run  # the main thread is one of them


@needs_bwrap
def test_runs_from_many_threads_at_once(sandbox):
    from concurrent.futures import ThreadPoolExecutor

    code = "a, b = map(int, input().split())\nprint(a + b)"
    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(lambda _: score_code(fenced(code), ADD_TESTS, sandbox=sandbox).reward, range(12)))
    assert results == [1.0] * 12


@needs_bwrap
def test_prestarted_runs_are_fast(sandbox):
    """Sanity bound only (the benchmark measures): a pre-started container answers well under 0.3 s."""
    times = []
    for _ in range(8):
        start = time.perf_counter()
        assert sandbox.run("print(1)", [{"input": ""}]).tests[0].stdout == "1\n"
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.3, times


@needs_bwrap
def test_selftest_and_features(sandbox):
    sandbox.selftest()
    assert sandbox.features["bwrap"] and sandbox.features["python"]


def test_missing_bwrap_is_a_clear_error():
    with pytest.raises(SandboxUnavailable, match="bubblewrap"):
        Sandbox(SandboxConfig(bwrap="/nonexistent/bwrap", prestart=0))


def test_bad_limits_name_the_field():
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=0)
    with pytest.raises(ValueError, match="wall_s"):
        Limits(wall_s="2")


def test_malformed_loader_replies_become_protocol_errors():
    assert TestRun.from_wire("junk").status == "sandbox_protocol"
    assert TestRun.from_wire({"status": "exited", "stdout": 3}).status == "sandbox_protocol"
    assert TestRun.from_wire({"status": "exited", "exit_code": True}).status == "sandbox_protocol"
    ok = TestRun.from_wire({"status": "exited", "exit_code": 0, "stdout": "1\n", "extra": [1]})
    assert (ok.status, ok.exit_code, ok.stdout) == ("exited", 0, "1\n")
