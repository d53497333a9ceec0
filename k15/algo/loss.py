"""The online mirror-descent loss of Kimi k1.5 (paper section 2.3.2, K15_METHOD.md).

For k samples of one prompt drawn from pi_theta_i (the weights at the start of the iteration):

    L = (1/k) sum_j ( r_j - rbar - tau * Delta_j )^2,   Delta_j = sum_t logp_{j,t} - logp_old_{j,t}

We minimise L / (2 tau), averaged over prompts, so that the gradient is exactly minus the paper's
eq. 3: every trained token of sequence j gets the upstream gradient -(r_j - rbar - tau Delta_j) / k.

Inputs are *packed*: per-token tensors of all sequences concatenated, with `seq_ids` telling which
sequence each token belongs to. The fused Triton version in k15.kernels takes the same arguments
(with hidden states and the LM head in place of `logp`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossStats:
    loss: float
    mean_reward: float
    mean_advantage_abs: float  # mean |r - rbar|
    mean_log_ratio: float  # mean Delta_j: 0 at the first step of an iteration
    num_sequences: int
    num_tokens: int


def check_packed(logp: torch.Tensor, old_logp: torch.Tensor, seq_ids: torch.Tensor) -> None:
    """The per-token inputs of a packed batch line up (every policy loss takes them)."""
    if logp.shape != old_logp.shape or logp.shape != seq_ids.shape:
        raise ValueError(
            f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and seq_ids "
            f"{tuple(seq_ids.shape)} must have the same shape"
        )


def sequence_sums(values: torch.Tensor, seq_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum per-token `values` [N] into per-sequence totals [S] in fp32; tokens with seq_id -1 are skipped."""
    keep = seq_ids >= 0
    out = torch.zeros(num_sequences, dtype=torch.float32, device=values.device)
    return out.index_add(0, seq_ids[keep], values[keep].float())


def group_baseline(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rbar for every sequence: the mean reward of its group of k consecutive sequences."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} sequences do not split into groups of k={group_size}")
    groups = rewards.float().view(-1, group_size)
    return groups.mean(dim=1, keepdim=True).expand_as(groups).reshape(-1)


def mirror_descent_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    seq_ids: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    tau: float,
) -> tuple[torch.Tensor, LossStats]:
    """Mirror-descent loss over a packed batch.

    logp:      [N] log-probs of the trained tokens under the current weights (differentiable).
    old_logp:  [N] log-probs of the same tokens under pi_theta_i, computed by the same function.
    seq_ids:   [N] int64, the sequence of each token in [0, S); -1 marks a token left out of the loss.
    rewards:   [S] rewards; sequences come in groups of `group_size` consecutive rows per prompt.
    Returns the scalar loss (mean over prompts of L / (2 tau), over the sequences that have tokens
    here) and detached statistics. Calls on disjoint sets of sequences with the same `rewards` add
    up, loss and mean_log_ratio both: that is how the trainer accumulates micro-batches.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    check_packed(logp, old_logp, seq_ids)
    num_sequences = rewards.numel()
    rewards = rewards.float()
    log_ratio = sequence_sums(logp.float() - old_logp.float(), seq_ids, num_sequences)
    advantage = rewards - group_baseline(rewards, group_size)
    residual = advantage - tau * log_ratio
    # A sequence without a token here adds only a constant (its gradient is 0): leaving it out
    # makes the loss of a batch split by sequence into micro-batches the sum of theirs.
    present = sequence_sums(torch.ones_like(logp), seq_ids, num_sequences) > 0
    num_groups = num_sequences // group_size
    loss = (residual.pow(2) * present).sum() / (group_size * num_groups * 2.0 * tau)
    stats = LossStats(
        loss=loss.item(),
        mean_reward=rewards.mean().item(),
        mean_advantage_abs=advantage.abs().mean().item(),
        mean_log_ratio=log_ratio.detach().mean().item(),
        num_sequences=num_sequences,
        num_tokens=int((seq_ids >= 0).sum().item()),
    )
    return loss, stats
