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

import torch


class LossStats:
    """Detached statistics of one loss call. They stay on the loss's device until one is read, and
    reading one fetches them all at once: a trainer that keeps `values` (and sums them over
    micro-batches on the device) never makes the host wait for the GPU between forward and backward."""

    FIELDS = ("loss", "mean_reward", "mean_advantage_abs", "mean_log_ratio", "num_tokens")

    def __init__(self, num_sequences: int, **values: torch.Tensor):
        self.num_sequences = num_sequences
        # float64: num_tokens stays exact
        self.values = torch.stack([values[f].detach().to(torch.float64).reshape(()) for f in self.FIELDS])
        self._host: dict | None = None

    def host(self) -> dict:
        """The statistics as Python numbers (the first call waits for the GPU, once)."""
        if self._host is None:
            self._host = dict(zip(self.FIELDS, self.values.tolist()))
            self._host["num_tokens"] = int(self._host["num_tokens"])
        return self._host

    loss = property(lambda self: self.host()["loss"])
    mean_reward = property(lambda self: self.host()["mean_reward"])
    mean_advantage_abs = property(lambda self: self.host()["mean_advantage_abs"])  # mean |r - rbar|
    mean_log_ratio = property(lambda self: self.host()["mean_log_ratio"])  # mean Delta_j: 0 at an iteration's first step
    num_tokens = property(lambda self: self.host()["num_tokens"])

    def __repr__(self) -> str:
        return f"LossStats({self.host()}, num_sequences={self.num_sequences})"


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
    # masked, not selected: selecting by a boolean mask makes the host wait for the GPU
    return out.index_add(0, seq_ids.clamp(min=0), torch.where(keep, values.float(), 0.0))


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
    stats = LossStats(num_sequences, loss=loss, mean_reward=rewards.mean(), mean_advantage_abs=advantage.abs().mean(),
                      mean_log_ratio=log_ratio.mean(), num_tokens=(seq_ids >= 0).sum())
    return loss, stats
