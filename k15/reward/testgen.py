"""Test-case generation for code problems without tests (paper 2.3.5, K15_METHOD.md).

For one problem: take test inputs (given, or printed by a generator program run on seeds 0..n-1),
run every reference solution on every input in the sandbox, keep an input as a test case if at
least 7 of 10 solutions agree on its output (the majority output becomes the expected output), and
keep the problem if at least 9 of 10 solutions pass all kept cases. With other than 10 solutions
the thresholds scale: ceil(0.7 n) and ceil(0.9 n). Every program here is untrusted (reference
solutions and generators often come from a model too), so all of it runs in the sandbox.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from k15.reward.code import stdout_matches
from k15.reward.sandbox import Limits, Sandbox

CASE_AGREEMENT = 0.7  # 7 of 10 solutions agree on a case's output
PROBLEM_PASS = 0.9  # 9 of 10 solutions pass all kept cases


@dataclass
class GeneratedTests:
    tests: list[dict]  # kept cases: {"input", "output"}
    keep: bool  # the problem stays in the training set
    reason: str  # "kept", "no_inputs", "no_agreed_cases", "too_few_passing_solutions"
    num_inputs: int
    num_solutions: int
    passing_solutions: int
    agreement: list[int] = field(default_factory=list)  # per input: size of the largest agreeing group

    def to_answer(self, limits: Limits | None = None) -> str:
        """The `answer` field of a code row (see k15.reward.code)."""
        spec = {"style": "stdio", "tests": self.tests}
        if limits is not None:
            spec["limits"] = dict(limits.__dict__)
        return json.dumps(spec)


def _key(out: str) -> str:
    return " ".join(out.split())  # agreement up to whitespace, as the verifier compares


def _outputs(sandbox: Sandbox, code: str, inputs: list[str], limits: Limits) -> list[str | None]:
    """stdout per input, None where the program failed (error, limit, signal)."""
    runs = sandbox.run(code, [{"input": x} for x in inputs], limits=limits).tests
    cap = limits.output_kb * 1024
    outs: list[str | None] = []
    for i in range(len(inputs)):
        r = runs[i] if i < len(runs) else None
        ok = r is not None and r.status == "exited" and r.exit_code == 0 and r.stdout_bytes <= cap
        outs.append(r.stdout if ok else None)
    return outs


def generate_inputs(sandbox: Sandbox, generator: str, n: int, limits: Limits | None = None) -> list[str]:
    """Run a generator program on seeds 0..n-1 (the seed arrives on stdin); distinct non-empty
    outputs, in seed order."""
    outs = _outputs(sandbox, generator, [f"{seed}\n" for seed in range(n)], limits or sandbox.config.limits)
    seen, inputs = set(), []
    for out in outs:
        if out and out.strip() and out not in seen:
            seen.add(out)
            inputs.append(out)
    return inputs


def generate_tests(reference_solutions: list[str], sandbox: Sandbox, inputs: list[str] | None = None,
                   generator: str | None = None, num_inputs: int = 50, limits: Limits | None = None,
                   case_agreement: float = CASE_AGREEMENT, problem_pass: float = PROBLEM_PASS) -> GeneratedTests:
    """Build test cases for one problem from its reference solutions (see the module docstring)."""
    if not reference_solutions or not all(isinstance(s, str) for s in reference_solutions):
        raise ValueError("testgen 'reference_solutions' must be a non-empty list of programs")
    if (inputs is None) == (generator is None):
        raise ValueError("testgen needs exactly one of 'inputs' or 'generator'")
    if not (0 < case_agreement <= 1 and 0 < problem_pass <= 1):
        raise ValueError("testgen 'case_agreement' and 'problem_pass' must be in (0, 1]")
    limits = limits or sandbox.config.limits
    if generator is not None:
        inputs = generate_inputs(sandbox, generator, num_inputs, limits)
    inputs = [x for x in inputs if isinstance(x, str)][:num_inputs]
    n = len(reference_solutions)
    if not inputs:
        return GeneratedTests([], False, "no_inputs", 0, n, 0)

    outputs = [_outputs(sandbox, sol, inputs, limits) for sol in reference_solutions]
    need_agree = math.ceil(case_agreement * n - 1e-9)
    need_pass = math.ceil(problem_pass * n - 1e-9)

    tests, kept_idx, agreement = [], [], []
    for j, x in enumerate(inputs):
        groups: dict[str, list[int]] = {}
        for s in range(n):
            if outputs[s][j] is not None:
                groups.setdefault(_key(outputs[s][j]), []).append(s)
        best = max(groups.values(), key=len) if groups else []
        agreement.append(len(best))
        if len(best) >= need_agree:
            tests.append({"input": x, "output": outputs[best[0]][j]})
            kept_idx.append(j)
    if not tests:
        return GeneratedTests([], False, "no_agreed_cases", len(inputs), n, 0, agreement)

    passing = sum(
        all(outputs[s][j] is not None and stdout_matches(outputs[s][j], t["output"])
            for j, t in zip(kept_idx, tests))
        for s in range(n)
    )
    keep = passing >= need_pass
    return GeneratedTests(tests, keep, "kept" if keep else "too_few_passing_solutions",
                          len(inputs), n, passing, agreement)
