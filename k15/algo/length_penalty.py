"""The length reward of Kimi k1.5 (paper 2.3.3, K15_METHOD.md).

Within the k responses to one prompt, with min_len and max_len their token lengths:

    lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)       (all 0 when max_len == min_len)
    len_reward_i = lambda_i if response i is correct, else min(0, lambda_i)

so short correct answers gain, long ones lose, and a wrong answer is never rewarded for being short.
"""

from __future__ import annotations

import numpy as np


def length_rewards(lengths, correct, group_size: int) -> np.ndarray:
    """Length rewards for consecutive groups of `group_size` responses (rows of a group adjacent)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if lengths.shape != correct.shape or lengths.ndim != 1:
        raise ValueError(f"lengths {lengths.shape} and correct {correct.shape} must be the same 1-d shape")
    if lengths.size % group_size:
        raise ValueError(f"{lengths.size} responses do not split into groups of k={group_size}")
    groups = lengths.reshape(-1, group_size)
    lo, hi = groups.min(axis=1, keepdims=True), groups.max(axis=1, keepdims=True)
    span = np.where(hi > lo, hi - lo, 1.0)
    lam = np.where(hi > lo, 0.5 - (groups - lo) / span, 0.0).reshape(-1)
    return np.where(correct, lam, np.minimum(0.0, lam))


def penalty_weight(iteration: int, weight: float, start_iter: int) -> float:
    """The paper's warm-up: no length reward before `start_iter`, then a constant weight."""
    return weight if iteration >= start_iter else 0.0
