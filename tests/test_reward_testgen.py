"""Test-case generation: 7-of-10 agreement per case, 9-of-10 passing solutions per problem."""

from __future__ import annotations

import json

import pytest

from k15.reward.code import score_code
from k15.reward.sandbox import Limits, Sandbox, SandboxConfig, bwrap_path
from k15.reward.testgen import generate_tests

pytestmark = pytest.mark.skipif(
    bwrap_path() is None, reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
)
LIMITS = Limits(cpu_s=1, wall_s=1.5, memory_mb=256, processes=8, file_mb=4, output_kb=64)

# Problem: print the sum of the integers on the line.
CORRECT = [
    "print(sum(map(int, input().split())))",
    "xs = [int(t) for t in input().split()]\ntotal = 0\nfor x in xs:\n    total += x\nprint(total)",
    "import sys\nprint(sum(int(t) for t in sys.stdin.read().split()))",
    "from functools import reduce\nprint(reduce(lambda a, b: a + b, map(int, input().split()), 0))",
    "print(eval('+'.join(input().split()) or '0'))",
    "s = 0\nfor t in input().split(): s += int(t)\nprint(s)",
    "import math\nprint(math.fsum(map(int, input().split())).__int__())",
    "xs = list(map(int, input().split()))\nprint(sum(sorted(xs)))",
    "print(sum([int(x) for x in input().strip().split(' ') if x]))",
]
WRONG_ON_NEGATIVES = "print(sum(abs(int(t)) for t in input().split()))"
CRASHES = "raise SystemExit(1)"
INPUTS = ["1 2 3\n", "5\n", "10 -4\n", "-1 -1\n", "0 0 0 0\n", "7 8\n"]


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(SandboxConfig(prestart=2, limits=LIMITS))
    yield sb
    sb.close()


def test_nine_correct_of_ten_keep_the_problem(sandbox):
    gen = generate_tests(CORRECT + [WRONG_ON_NEGATIVES], sandbox, inputs=INPUTS)
    assert gen.keep and gen.reason == "kept"
    assert gen.num_solutions == 10 and gen.passing_solutions == 9
    assert [t["input"] for t in gen.tests] == INPUTS  # 9 agree on every case (>= 7)
    assert gen.tests[2]["output"].strip() == "6" and gen.tests[3]["output"].strip() == "-2"
    # the generated tests work as a code row's answer
    answer = gen.to_answer(LIMITS)
    assert score_code(f"```python\n{CORRECT[0]}\n```", answer, sandbox=sandbox).reward == 1.0
    assert score_code(f"```python\n{WRONG_ON_NEGATIVES}\n```", answer, sandbox=sandbox).reward == 0.0


def test_seven_correct_of_ten_keep_cases_but_drop_the_problem(sandbox):
    sols = CORRECT[:7] + [WRONG_ON_NEGATIVES, WRONG_ON_NEGATIVES, CRASHES]
    gen = generate_tests(sols, sandbox, inputs=INPUTS)
    assert len(gen.tests) == len(INPUTS)  # 7 of 10 agree everywhere
    assert gen.passing_solutions == 7 and not gen.keep
    assert gen.reason == "too_few_passing_solutions"


def test_cases_without_a_seven_way_majority_are_dropped(sandbox):
    # 6 correct, 4 wrong on negatives: inputs without negatives get 10 votes, with negatives 6 vs 4
    sols = CORRECT[:6] + [WRONG_ON_NEGATIVES] * 4
    gen = generate_tests(sols, sandbox, inputs=INPUTS)
    kept = [t["input"] for t in gen.tests]
    assert kept == ["1 2 3\n", "5\n", "0 0 0 0\n", "7 8\n"]
    assert gen.agreement == [10, 10, 6, 6, 10, 10]
    # every solution passes the kept (non-negative) cases, so the problem is kept
    assert gen.passing_solutions == 10 and gen.keep


def test_inputs_from_a_generator_program(sandbox):
    generator = (
        "import random\n"
        "seed = int(input())\n"
        "rng = random.Random(seed)\n"
        "print(' '.join(str(rng.randint(-9, 9)) for _ in range(rng.randint(1, 5))))\n"
    )
    gen = generate_tests(CORRECT[:9] + [CRASHES], sandbox, generator=generator, num_inputs=12)
    assert gen.keep and gen.num_inputs == len(gen.tests) and 8 <= gen.num_inputs <= 12
    for t in gen.tests:
        assert int(t["output"]) == sum(int(x) for x in t["input"].split())


def test_no_agreement_at_all(sandbox):
    sols = [f"print({i})" for i in range(10)]
    gen = generate_tests(sols, sandbox, inputs=INPUTS)
    assert not gen.keep and gen.reason == "no_agreed_cases" and gen.tests == []


def test_a_broken_generator_gives_no_inputs(sandbox):
    gen = generate_tests(CORRECT, sandbox, generator="raise SystemExit(3)", num_inputs=5)
    assert not gen.keep and gen.reason == "no_inputs"


def test_arguments_are_checked(sandbox):
    with pytest.raises(ValueError, match="reference_solutions"):
        generate_tests([], sandbox, inputs=INPUTS)
    with pytest.raises(ValueError, match="exactly one"):
        generate_tests(CORRECT, sandbox)
    with pytest.raises(ValueError, match="case_agreement"):
        generate_tests(CORRECT, sandbox, inputs=INPUTS, case_agreement=1.5)
    assert json.loads(generate_tests(CORRECT, sandbox, inputs=INPUTS[:1]).to_answer())["tests"]
