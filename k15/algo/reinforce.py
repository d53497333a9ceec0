"""REINFORCE with the group-mean baseline, for comparison with mirror descent:

    loss = -(1/S) sum_j (r_j - rbar_j) * sum_t logp_{j,t}

At the first step of an iteration its gradient equals mirror descent's (where Delta_j = 0); it has
no term that holds the policy near the iteration's reference. Inputs packed as in k15.algo.loss.
"""

from __future__ import annotations

import torch

from k15.algo.loss import LossStats, check_packed, group_baseline, sequence_sums


def reinforce_loss(logp: torch.Tensor, old_logp: torch.Tensor, seq_ids: torch.Tensor, rewards: torch.Tensor,
                   group_size: int) -> tuple[torch.Tensor, LossStats]:
    check_packed(logp, old_logp, seq_ids)
    num_sequences = rewards.numel()
    rewards = rewards.float()
    advantage = rewards - group_baseline(rewards, group_size)
    seq_logp = sequence_sums(logp, seq_ids, num_sequences)
    loss = -(advantage * seq_logp).sum() / num_sequences
    stats = LossStats(num_sequences, loss=loss, mean_reward=rewards.mean(), mean_advantage_abs=advantage.abs().mean(),
                      mean_log_ratio=sequence_sums((logp - old_logp).detach(), seq_ids, num_sequences).mean(),
                      num_tokens=(seq_ids >= 0).sum())
    return loss, stats
