"""GRPO (Shao et al. 2024), for comparison with mirror descent behind the same trainer interface.

Group-normalised advantages A_j = (r_j - mean_g) / (std_g + eps) and the PPO clipped surrogate per
token, with ratio = pi_theta / pi_old (pi_old: the weights that start the iteration):

    loss = mean_j  mean_{t in j}  -min(ratio_t * A_j, clip(ratio_t, 1 - eps_clip, 1 + eps_clip) * A_j)

No KL term (beta = 0, as DAPO and Dr. GRPO run it); the inputs are packed as in k15.algo.loss.
"""

from __future__ import annotations

import torch

from k15.algo.loss import LossStats, check_packed, sequence_sums


def group_normalized_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} sequences do not split into groups of k={group_size}")
    groups = rewards.float().view(-1, group_size)
    mean, std = groups.mean(dim=1, keepdim=True), groups.std(dim=1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + eps)).reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, seq_ids: torch.Tensor, rewards: torch.Tensor,
              group_size: int, clip_eps: float = 0.2) -> tuple[torch.Tensor, LossStats]:
    check_packed(logp, old_logp, seq_ids)
    num_sequences = rewards.numel()
    advantage = group_normalized_advantages(rewards, group_size)
    keep = seq_ids >= 0  # masked, not selected: selecting by a mask makes the host wait for the GPU
    log_ratio = torch.where(keep, logp.float() - old_logp.float(), 0.0)
    ratio = log_ratio.exp()
    adv = advantage[seq_ids.clamp(min=0)]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    tokens_per_seq = sequence_sums(torch.ones_like(ratio), seq_ids, num_sequences)
    per_seq = sequence_sums(per_token, seq_ids, num_sequences) / tokens_per_seq.clamp(min=1)
    loss = per_seq.sum() / num_sequences
    stats = LossStats(num_sequences, loss=loss, mean_reward=rewards.float().mean(),
                      mean_advantage_abs=advantage.abs().mean(),
                      mean_log_ratio=sequence_sums(log_ratio.detach(), seq_ids, num_sequences).mean(), num_tokens=keep.sum())
    return loss, stats
