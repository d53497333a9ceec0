"""Prompt samplers. Uniform: every problem once per epoch, in a seeded shuffled order."""

from __future__ import annotations

import random


class UniformSampler:
    def __init__(self, num_problems: int, seed: int):
        if num_problems <= 0:
            raise ValueError("the prompt set is empty")
        self.num_problems = num_problems
        self.rng = random.Random(seed)
        self._order: list[int] = []

    def sample(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = list(range(self.num_problems))
                self.rng.shuffle(self._order)
            out.append(self._order.pop())
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self._order = list(state["order"])
