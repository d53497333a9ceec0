"""The k1.5 mirror-descent loss over a packed batch, on top of the fused log-prob kernel.

`fused_mirror_descent_loss(hidden, weight, targets, old_logp, seq_ids, rewards, group_size, tau)`
is `k15.algo.loss.mirror_descent_loss(fused_logprobs(hidden, weight, targets'), old_logp, ...)`
where targets' ignores every token with seq_id -1, so those tokens cost no GEMM work. Autograd
through the plain-PyTorch loss gives each trained token of sequence j the upstream gradient
-(r_j - rbar_j - tau * Delta_j) / (k * num_groups) (K15_METHOD.md), and the fused backward turns it
into dHidden and dWeight exactly. The reference is kernels/logprobs_ref.reference_mirror_descent_loss.

old_logp=None means "the weights that generated the batch are the current ones" (the first step of
an iteration): the old log-probs are the new ones, detached, so Delta_j = 0 exactly and the old
log-probs cost no extra forward pass.
"""

from __future__ import annotations

import torch

from .logprobs_ref import IGNORE_INDEX


def fused_mirror_descent_loss_impl(
    logprobs_fn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    seq_ids: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    tau: float,
    temperature: float = 1.0,
    return_aux: bool = False,
):
    from k15.algo.loss import mirror_descent_loss

    if seq_ids.shape != targets.shape:
        raise ValueError(f"seq_ids {tuple(seq_ids.shape)} and targets {tuple(targets.shape)} differ")
    tgt = torch.where(seq_ids >= 0, targets, torch.full_like(targets, IGNORE_INDEX))
    out = logprobs_fn(hidden, weight, tgt, temperature=temperature, return_entropy=return_aux)
    logp, entropy = out if return_aux else (out, None)
    if old_logp is None:  # first step of an iteration: pi_theta_i is the current policy, Delta_j = 0
        old_logp = logp.detach()
    loss, stats = mirror_descent_loss(logp, old_logp, seq_ids, rewards, group_size, tau)
    if not return_aux:
        return loss, stats
    return loss, stats, {"logp": logp.detach(), "entropy": entropy}
