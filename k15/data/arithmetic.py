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


def make_problem(rng: random.Random, prompt_id: str, min_ops: int, max_ops: int, max_operand: int) -> Problem:
    num_ops = rng.randint(min_ops, max_ops)
    value = rng.randint(1, max_operand)
    operands, ops = [value], []
    for _ in range(num_ops):
        x = rng.randint(1, max_operand)
        op = "-" if (rng.random() < 0.5 and x <= value) else "+"
        value = value + x if op == "+" else value - x
        operands.append(x)
        ops.append(op)
    expr = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:]))
    return Problem(prompt_id, PROMPT_TEMPLATE.format(expr=expr), str(value), float(num_ops),
                   operands=tuple(operands), ops=tuple(ops))


def worked_solution(p: Problem) -> str:
    """The chain of thought: one step per operation, then the boxed answer."""
    steps, value = [], p.operands[0]
    for op, x in zip(p.ops, p.operands[1:]):
        new = value + x if op == "+" else value - x
        steps.append(f"{value}{op}{x}={new}")
        value = new
    return " " + ", ".join(steps) + "." + ANSWER_TEMPLATE.format(value=value)


def direct_solution(p: Problem) -> str:
    return ANSWER_TEMPLATE.format(value=p.answer)


def generate_problems(n: int, seed: int, min_ops: int = 2, max_ops: int = 4, max_operand: int = 9,
                      prefix: str = "arith") -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, f"{prefix}-{seed}-{i}", min_ops, max_ops, max_operand) for i in range(n)]


def split_disjoint(train: list[Problem], held_out: list[Problem]) -> list[Problem]:
    """Drop training problems whose prompt also appears in the held-out set."""
    seen = {p.prompt for p in held_out}
    return [p for p in train if p.prompt not in seen]
