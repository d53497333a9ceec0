"""Direct preference optimisation (Rafailov et al. 2023), the DPO long2short method of paper 2.4.

For a pair (chosen y_w, rejected y_l) of responses to one prompt, with sequence log-probs summed
over response tokens:

    loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

The reference log-probs are those of the starting (long-CoT) policy, computed once before training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class DPOStats:
    loss: float
    accuracy: float  # share of pairs whose implicit reward ranks the chosen response higher
    margin: float  # mean beta * (chosen log-ratio - rejected log-ratio)


def dpo_loss(chosen_logp: torch.Tensor, rejected_logp: torch.Tensor, ref_chosen_logp: torch.Tensor,
             ref_rejected_logp: torch.Tensor, beta: float) -> tuple[torch.Tensor, DPOStats]:
    """Mean DPO loss over pairs; every argument is a [pairs] tensor of sequence log-probs."""
    shapes = {t.shape for t in (chosen_logp, rejected_logp, ref_chosen_logp, ref_rejected_logp)}
    if len(shapes) != 1 or chosen_logp.dim() != 1:
        raise ValueError(f"dpo_loss needs four [pairs] tensors of one shape, got {sorted(map(tuple, shapes))}")
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    margin = beta * ((chosen_logp - ref_chosen_logp) - (rejected_logp - ref_rejected_logp))
    loss = -F.logsigmoid(margin).mean()
    return loss, DPOStats(loss=loss.item(), accuracy=(margin > 0).float().mean().item(), margin=margin.mean().item())
