"""The built-in verifiable task: multi-step integer arithmetic, where a written chain of thought helps.

A problem is a chain of additions and subtractions ("7+3-5+9"); intermediate results never go
negative. A worked solution writes each step ("7+3=10, 10-5=5, 5+9=14.") before the boxed answer;
a direct solution states the answer at once. A small model that answers directly is mostly wrong
on long chains; one that writes the steps is mostly right: RL has something real to find.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

PROMPT_TEMPLATE = "Q: {expr}=?\nA:"
ANSWER_TEMPLATE = " The answer is \\boxed{{{value}}}."


@dataclass(frozen=True)
class Problem:
    prompt_id: str
    prompt: str
    answer: str
    difficulty: float  # number of operations
    task: str = "math"
    operands: tuple[int, ...] = ()
    ops: tuple[str, ...] = ()

    def as_record(self) -> dict:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "answer": self.answer,
                "difficulty": self.difficulty, "task": self.task}


def make_problem(rng: random.Random, prompt_id: str, min_ops: int, max_ops: int, max_value: int) -> Problem:
    """A chain of `min_ops..max_ops` additions and subtractions of positive operands whose running
    value stays within [0, max_value], so every step of the worked solution is a small fact."""
    num_ops = rng.randint(min_ops, max_ops)
    value = rng.randint(1, max_value)
    operands, ops = [value], []
    for _ in range(num_ops):
        can_add, can_sub = value < max_value, value > 0
        op = "+" if (can_add and (not can_sub or rng.random() < 0.5)) else "-"
        x = rng.randint(1, max_value - value) if op == "+" else rng.randint(1, value)
        value = value + x if op == "+" else value - x
        operands.append(x)
        ops.append(op)
    expr = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:]))
    return Problem(prompt_id, PROMPT_TEMPLATE.format(expr=expr), str(value), float(num_ops),
                   operands=tuple(operands), ops=tuple(ops))


def worked_solution(p: Problem, check: bool = False) -> str:
    """The chain of thought: reduce the leftmost operation, rewrite the rest, until one number is left
    ("7+3-5+9=10-5+9=5+9=14."), then the boxed answer. Each step only looks at the step before it.
    With `check`, the solution also verifies its result by undoing every operation back to the first
    operand ("Check: 14-9=5, 5+5=10, 10-3=7.") -- the kind of reflection a long chain of thought
    carries, which the answer does not need and a length penalty can teach the model to drop."""
    values, ops = list(p.operands), list(p.ops)
    steps = []
    while ops:
        a, op, b = values[0], ops[0], values[1]
        values = [a + b if op == "+" else a - b] + values[2:]
        ops = ops[1:]
        steps.append(str(values[0]) + "".join(f"{o}{x}" for o, x in zip(ops, values[1:])))
    expr = str(p.operands[0]) + "".join(f"{o}{x}" for o, x in zip(p.ops, p.operands[1:]))
    text = " " + "=".join([expr] + steps) + "."
    if check:
        text += " Check: " + ", ".join(undo_steps(p)) + "."
    return text + ANSWER_TEMPLATE.format(value=values[0])


def undo_steps(p: Problem) -> list[str]:
    """From the result back to the first operand: "14-9=5", "5+5=10", "10-3=7"."""
    value = int(p.answer)
    out = []
    for op, x in zip(reversed(p.ops), reversed(p.operands[1:])):
        back = value - x if op == "+" else value + x
        out.append(f"{value}{'-' if op == '+' else '+'}{x}={back}")
        value = back
    return out


def direct_solution(p: Problem) -> str:
    return ANSWER_TEMPLATE.format(value=p.answer)


def generate_problems(n: int, seed: int, min_ops: int = 2, max_ops: int = 5, max_value: int = 9,
                      prefix: str = "arith") -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, f"{prefix}-{seed}-{i}", min_ops, max_ops, max_value) for i in range(n)]


def split_disjoint(train: list[Problem], held_out: list[Problem]) -> list[Problem]:
    """Drop training problems whose prompt also appears in the held-out set."""
    seen = {p.prompt for p in held_out}
    return [p for p in train if p.prompt not in seen]
