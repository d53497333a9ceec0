"""Code answers: extract the program from a response, run it on the problem's tests in the sandbox.

The `answer` field of a code row holds the tests as JSON, in one of two shapes:

    {"style": "stdio", "tests": [{"input": "1 2\\n", "output": "3\\n"}, ...],
     "compare": "tokens" | "lines" | "exact", "limits": {"cpu_s": 2, ...}}
    {"style": "call", "fn_name": "add", "tests": [{"args": [1, 2], "kwargs": {}, "output": 3}, ...]}

or the APPS/TACO shape {"inputs": [...], "outputs": [...], "fn_name": optional}. The reward is 1
only if every test passes (paper 2.3.5); the run stops at the first failure. Expected outputs never
enter the sandbox. `parse_code_tests` raises ValueError naming the bad field (for data loaders);
`score_code` never raises on the response.
"""

from __future__ import annotations

import json
import math
import re
import signal as _signal
import threading
from dataclasses import dataclass, field

from k15.reward.result import RewardResult
from k15.reward.sandbox import Limits, Sandbox, SandboxConfig, SandboxError, TestRun

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PY_TAGS = {"python", "py", "python3", "py3"}
MAX_CODE_CHARS = 100_000
COMPARE_MODES = ("tokens", "lines", "exact")


@dataclass(frozen=True)
class CodeTests:
    style: str  # "stdio" | "call"
    tests: tuple
    fn_name: str | None = None
    compare: str = "tokens"
    float_tol: float = 1e-6  # relative and absolute tolerance for numbers (tokens / call results)
    limits: Limits = field(default_factory=Limits)
    max_total_s: float = 30.0  # wall budget for all tests of one program


def parse_code_tests(answer, default_limits: Limits | None = None) -> CodeTests:
    """Validate a tests specification (JSON text or dict); ValueError names the bad field."""
    if isinstance(answer, (str, bytes)):
        try:
            spec = json.loads(answer)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"code 'answer' is not valid JSON: {e}") from None
    else:
        spec = answer
    if not isinstance(spec, dict):
        raise ValueError(f"code 'answer' must be a JSON object, got {type(spec).__name__}")
    spec = dict(spec)
    if "tests" not in spec and "inputs" in spec:  # APPS / TACO
        ins, outs = spec.pop("inputs"), spec.pop("outputs", None)
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise ValueError("code 'inputs' and 'outputs' must be lists of the same length")
        if spec.get("fn_name"):
            spec["style"] = "call"
            spec["tests"] = [{"args": a if isinstance(a, list) else [a], "output": o} for a, o in zip(ins, outs)]
        else:
            spec["tests"] = [{"input": a, "output": o} for a, o in zip(ins, outs)]
    style = spec.get("style", "call" if spec.get("fn_name") else "stdio")
    if style not in ("stdio", "call"):
        raise ValueError(f"code 'style' must be 'stdio' or 'call', got {style!r}")
    tests = spec.get("tests")
    if not isinstance(tests, list) or not tests:
        raise ValueError("code 'tests' must be a non-empty list")
    fn_name = spec.get("fn_name")
    if style == "call" and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise ValueError(f"code 'fn_name' must be a Python identifier for style 'call', got {fn_name!r}")
    clean = []
    for i, t in enumerate(tests):
        if not isinstance(t, dict):
            raise ValueError(f"code 'tests[{i}]' must be an object")
        if "output" not in t:
            raise ValueError(f"code 'tests[{i}].output' is missing")
        if style == "stdio":
            if not isinstance(t.get("input", ""), str):
                raise ValueError(f"code 'tests[{i}].input' must be a string")
            if not isinstance(t["output"], str):
                raise ValueError(f"code 'tests[{i}].output' must be a string")
            clean.append({"input": t.get("input", ""), "output": t["output"]})
        else:
            args, kwargs = t.get("args", []), t.get("kwargs", {})
            if not isinstance(args, list):
                raise ValueError(f"code 'tests[{i}].args' must be a list")
            if not isinstance(kwargs, dict):
                raise ValueError(f"code 'tests[{i}].kwargs' must be an object")
            clean.append({"args": args, "kwargs": kwargs, "output": t["output"]})
    compare = spec.get("compare", "tokens")
    if compare not in COMPARE_MODES:
        raise ValueError(f"code 'compare' must be one of {COMPARE_MODES}, got {compare!r}")
    tol = spec.get("float_tol", 1e-6)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"code 'float_tol' must be a number >= 0, got {tol!r}")
    base = default_limits or Limits()
    try:
        limits = Limits.from_dict({**base.__dict__, **(spec.get("limits") or {})})
    except (TypeError, ValueError) as e:
        raise ValueError(f"code 'limits': {e}") from None
    total = spec.get("max_total_s", 30.0)
    if isinstance(total, bool) or not isinstance(total, (int, float)) or total <= 0:
        raise ValueError(f"code 'max_total_s' must be a positive number, got {total!r}")
    return CodeTests(style, tuple(clean), fn_name if style == "call" else None, compare,
                     float(tol), limits, float(total))


def extract_code(response: str) -> str | None:
    """The last fenced Python block (```python ... ```), else the last fenced block; None if none."""
    if not isinstance(response, str) or "```" not in response:
        return None
    blocks = _FENCE.findall(response)
    if not blocks:
        return None
    python = [body for tag, body in blocks if tag.lower() in _PY_TAGS]
    code = (python or [body for _, body in blocks])[-1]
    return code if code.strip() else None


# -- comparing -------------------------------------------------------------------------------
def _num_equal(a, b, tol: float) -> bool:
    if a == b:
        return True
    if not (math.isfinite(a) and math.isfinite(b)):
        return False
    return tol > 0 and math.isclose(a, b, rel_tol=tol, abs_tol=tol)


def _token_equal(got: str, want: str, tol: float) -> bool:
    if got == want:
        return True
    if "." not in want and "e" not in want.lower():
        return False
    try:
        return _num_equal(float(got), float(want), tol)
    except ValueError:
        return False


def stdout_matches(got: str, want: str, compare: str = "tokens", tol: float = 1e-6) -> bool:
    if compare == "exact":
        return got == want
    if compare == "lines":
        strip = lambda s: [line.rstrip() for line in s.rstrip().splitlines()]  # noqa: E731
        return strip(got) == strip(want)
    g, w = got.split(), want.split()
    return len(g) == len(w) and all(_token_equal(a, b, tol) for a, b in zip(g, w))


def value_matches(got, want, tol: float = 1e-6, _depth: int = 0) -> bool:
    """JSON values equal (tuples arrive as lists); floats within tol. `want` bounds the depth."""
    if _depth > 200:
        return False
    if isinstance(want, bool) or isinstance(got, bool):
        return type(want) is type(got) and want == got
    if isinstance(want, (int, float)) and isinstance(got, (int, float)):
        if isinstance(want, int) and isinstance(got, int):
            return want == got
        return _num_equal(float(got), float(want), tol)
    if isinstance(want, (list, tuple)):
        return (isinstance(got, list) and len(got) == len(want)
                and all(value_matches(g, w, tol, _depth + 1) for g, w in zip(got, want)))
    if isinstance(want, dict):
        return (isinstance(got, dict) and got.keys() == want.keys()
                and all(value_matches(got[k], want[k], tol, _depth + 1) for k in want))
    return got == want


def _failure(spec: CodeTests, test: dict, run: TestRun) -> str | None:
    """None if the test passed, else the reason it failed."""
    if run.status.startswith("sandbox") or run.status == "setup_error":
        return "sandbox_error"
    if run.status == "wall_timeout":
        return "time_limit"
    if run.status == "signaled":
        if run.signal == _signal.SIGXCPU or (run.signal == _signal.SIGKILL and run.cpu_s >= spec.limits.cpu_s):
            return "time_limit"
        if run.signal == _signal.SIGXFSZ:
            return "output_limit"
        return "runtime_error"
    if run.stdout_bytes > spec.limits.output_kb * 1024:
        return "output_limit"
    if run.exit_code != 0:
        return "memory_limit" if "MemoryError" in run.stderr[-300:] else "runtime_error"
    if spec.style == "stdio":
        ok = stdout_matches(run.stdout, test["output"], spec.compare, spec.float_tol)
    else:
        try:
            got = json.loads(run.result) if run.result is not None else None
        except (ValueError, RecursionError):
            return "wrong_answer"
        ok = run.result is not None and value_matches(got, test["output"], spec.float_tol)
    return None if ok else "wrong_answer"


# -- scoring ---------------------------------------------------------------------------------
_default_sandbox: Sandbox | None = None
_default_lock = threading.Lock()


def default_sandbox(config: SandboxConfig | None = None) -> Sandbox:
    """The process-wide sandbox (created on first use; raises SandboxUnavailable without bwrap)."""
    global _default_sandbox
    with _default_lock:
        if _default_sandbox is None:
            _default_sandbox = Sandbox(config)
        return _default_sandbox


def run_tests(code: str, spec: CodeTests, sandbox: Sandbox) -> tuple[bool, str, list[TestRun]]:
    """Run the program on the tests, stopping at the first failure: (all passed, reason, runs)."""
    failure: list[str] = []
    spent = [0.0]

    def judge(i: int, run: TestRun) -> bool:
        spent[0] += run.wall_s
        why = _failure(spec, spec.tests[i], run)
        if why is None and spent[0] > spec.max_total_s and i + 1 < len(spec.tests):
            why = "time_limit"
        if why is not None:
            failure.append(why)
            return False
        return True

    tests = [{k: v for k, v in t.items() if k != "output"} for t in spec.tests]  # no answers inside
    result = sandbox.run(code, tests, style=spec.style, fn_name=spec.fn_name, limits=spec.limits, judge=judge)
    if failure:
        return False, failure[0], result.tests
    if len(result.tests) < len(spec.tests) or any(r.status.startswith("sandbox") for r in result.tests):
        return False, "sandbox_error", result.tests  # the container gave out (lost, stuck, garbled)
    return True, "correct", result.tests


def score_code(response: str, answer, sandbox: Sandbox | None = None) -> RewardResult:
    """1.0 if the response's program passes every test in `answer`, else 0.0 with the reason.

    Raises ValueError only for a malformed `answer` (the dataset's fault, named by field);
    never raises on the response.
    """
    spec = answer if isinstance(answer, CodeTests) else parse_code_tests(answer)
    try:
        code = extract_code(response)
        if code is None:
            return RewardResult(0.0, "no_code")
        if len(code) > MAX_CODE_CHARS:
            return RewardResult(0.0, "code_too_long")
        passed, why, _ = run_tests(code, spec, sandbox or default_sandbox())
        return RewardResult(1.0 if passed else 0.0, why)
    except SandboxError as e:
        return RewardResult(0.0, f"sandbox_error: {e}"[:300])
    except Exception as e:  # untrusted input: report, never crash the run
        return RewardResult(0.0, f"error: {type(e).__name__}")
