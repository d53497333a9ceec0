"""Which problems an iteration trains on (paper 2.3.4).

- uniform: every problem once per epoch, in a seeded shuffled order (the baseline);
- curriculum: easy to hard by the problems' `difficulty` labels, on a schedule;
- prioritized: problem i with probability proportional to (1 - s_i), s_i its success rate so far,
  so the problems the model fails get more tries.

Every sampler has `sample(n, iteration)`, `update(index, success)` (called with each finished
group's fraction of correct answers) and a JSON-safe `state_dict()` saved with checkpoints.
"""

from __future__ import annotations

import math

import numpy as np


class UniformSampler:
    def __init__(self, num_problems: int, seed: int):
        if num_problems <= 0:
            raise ValueError("the prompt set is empty")
        self.num_problems = num_problems
        self.rng = np.random.default_rng(seed)
        self._order: list[int] = []

    def sample(self, n: int, iteration: int = 1) -> list[int]:
        out = []
        while len(out) < n:
            if not self._order:
                self._order = self.rng.permutation(self.num_problems).tolist()
            out.append(self._order.pop())
        return out

    def update(self, index: int, success: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {"name": "uniform", "rng": self.rng.bit_generator.state, "order": list(self._order)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self._order = list(state["order"])


class CurriculumSampler:
    """Problems sorted by difficulty (ties in seeded random order). `step`: draw from the easiest
    `start_fraction` before `switch_iter`, from the remaining harder ones after it (the paper's
    easy-to-hard switch). `linear`: the pool grows from the easiest `start_fraction` to all problems
    by `switch_iter`."""

    def __init__(self, difficulties: list[float], seed: int, schedule: str = "step", start_fraction: float = 0.5,
                 switch_iter: int = 24):
        if not difficulties:
            raise ValueError("the prompt set is empty")
        missing = [i for i, d in enumerate(difficulties) if d is None]
        if missing:
            raise ValueError(f"curriculum sampling needs a 'difficulty' on every problem; row {missing[0] + 1} "
                             f"has none (label them with `k15 curate`)")
        if schedule not in ("step", "linear"):
            raise ValueError(f"sampler.schedule must be 'step' or 'linear', got {schedule!r}")
        if not 0 < start_fraction <= 1:
            raise ValueError(f"sampler.start_fraction must be in (0, 1], got {start_fraction}")
        self.rng = np.random.default_rng(seed)
        tie_break = self.rng.permutation(len(difficulties))
        self.by_difficulty = sorted(range(len(difficulties)), key=lambda i: (difficulties[i], tie_break[i]))
        self.schedule, self.start_fraction, self.switch_iter = schedule, start_fraction, max(1, switch_iter)

    def pool(self, iteration: int) -> list[int]:
        n = len(self.by_difficulty)
        easy = max(1, math.ceil(self.start_fraction * n - 1e-9))
        if self.schedule == "step":
            if iteration < self.switch_iter or easy >= n:
                return self.by_difficulty[:easy]
            return self.by_difficulty[easy:]
        progress = min(1.0, (iteration - 1) / max(1, self.switch_iter - 1))
        fraction = self.start_fraction + (1 - self.start_fraction) * progress
        return self.by_difficulty[:max(easy, math.ceil(fraction * n - 1e-9))]  # 1e-9: 0.6 * 100 is 60, not 61

    def sample(self, n: int, iteration: int = 1) -> list[int]:
        pool = self.pool(iteration)
        return [pool[i] for i in self.rng.choice(len(pool), size=n, replace=n > len(pool))]

    def update(self, index: int, success: float) -> None:
        pass

    def state_dict(self) -> dict:
        return {"name": "curriculum", "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


class PrioritizedSampler:
    """P(i) proportional to (1 - s_i) + floor. s_i moves toward each new group's success fraction
    by `ema` (1.0: the latest group only); problems not seen yet count as s_i = `prior`. The floor
    keeps solved problems in rotation, so a regression on them can still be noticed."""

    def __init__(self, prompt_ids: list[str], seed: int, ema: float = 0.5, prior: float = 0.5, floor: float = 0.02):
        if not prompt_ids:
            raise ValueError("the prompt set is empty")
        if not 0 < ema <= 1:
            raise ValueError(f"sampler.ema must be in (0, 1], got {ema}")
        if not 0 <= prior <= 1 or floor < 0:
            raise ValueError(f"sampler.prior must be in [0, 1] and sampler.floor >= 0, got {prior}, {floor}")
        self.prompt_ids = list(prompt_ids)
        self.ema, self.prior, self.floor = ema, prior, floor
        self.success = np.full(len(prompt_ids), np.nan)  # NaN: not seen yet
        self.rng = np.random.default_rng(seed)

    def weights(self) -> np.ndarray:
        s = np.where(np.isnan(self.success), self.prior, self.success)
        w = (1.0 - s) + self.floor
        return w / w.sum() if w.sum() > 0 else np.full(len(w), 1.0 / len(w))

    def sample(self, n: int, iteration: int = 1) -> list[int]:
        p = self.weights()
        replace = n > int((p > 0).sum())
        return self.rng.choice(len(p), size=n, replace=replace, p=p).tolist()

    def update(self, index: int, success: float) -> None:
        old = self.success[index]
        self.success[index] = success if np.isnan(old) else (1 - self.ema) * old + self.ema * success

    def state_dict(self) -> dict:
        rates = {pid: float(s) for pid, s in zip(self.prompt_ids, self.success) if not np.isnan(s)}
        return {"name": "prioritized", "rng": self.rng.bit_generator.state, "success_rates": rates}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        index = {pid: i for i, pid in enumerate(self.prompt_ids)}
        self.success[:] = np.nan
        for pid, s in state["success_rates"].items():
            if pid in index:  # problems no longer in the set are ignored
                self.success[index[pid]] = s


def make_sampler(cfg, records: list[dict], seed: int):
    """The sampler named by the `sampler` config, over the training records."""
    if cfg.name == "uniform":
        return UniformSampler(len(records), seed)
    if cfg.name == "curriculum":
        return CurriculumSampler([r.get("difficulty") for r in records], seed, cfg.schedule, cfg.start_fraction,
                                 cfg.switch_iter)
    if cfg.name == "prioritized":
        return PrioritizedSampler([r["prompt_id"] for r in records], seed, cfg.ema, cfg.prior, cfg.floor)
    raise ValueError(f"sampler.name must be uniform, curriculum or prioritized, got {cfg.name!r}")
