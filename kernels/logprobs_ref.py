"""Pure-PyTorch references for the fused log-prob kernels (kernels/logprobs.py).

These are the specification the Triton kernels are tested against, and the path the trainer takes
on CPU. They materialise the [N, V] logits in fp32, so they are for small problems (tests, the tiny
CPU model) only.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def ignored_mask(targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """True where a position is left out: target == ignore_index or any negative target."""
    return (targets < 0) | (targets == ignore_index)


def reference_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    return_entropy: bool = False,
):
    """log softmax(hidden @ weight.T / temperature)[i, targets[i]] in fp32, 0 at ignored positions.

    Differentiable with respect to hidden and weight (autograd through fp32 logits). With
    `return_entropy`, also returns the per-token entropy of the softmax (detached, 0 at ignored
    positions).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [N,H] and [V,H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    ignored = ignored_mask(targets, ignore_index)
    logits = (hidden.float() @ weight.float().t()) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    safe = torch.where(ignored, torch.zeros_like(targets), targets).long()
    logp = logits.gather(1, safe[:, None]).squeeze(1) - lse
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not return_entropy:
        return logp
    with torch.no_grad():
        p = torch.softmax(logits, dim=-1)
        entropy = lse - (p * logits).sum(-1)
        entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, entropy.detach()


def reference_mirror_descent_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor,
    seq_ids: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    tau: float,
    temperature: float = 1.0,
):
    """`mirror_descent_loss(reference_logprobs(...), ...)`: the specification of the fused loss."""
    from k15.algo.loss import mirror_descent_loss

    tgt = torch.where(seq_ids >= 0, targets, torch.full_like(targets, IGNORE_INDEX))
    logp = reference_logprobs(hidden, weight, tgt, temperature=temperature)
    return mirror_descent_loss(logp, old_logp, seq_ids, rewards, group_size, tau)
