"""Per-token log-probs of a causal LM on padded batches, through the plain or the fused head."""

from __future__ import annotations

import torch


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float,
                   impl: str = "torch") -> torch.Tensor:
    """logp[b, t] = log p(input_ids[b, t+1] | input_ids[b, :t+1]) in fp32, shape [B, T-1].

    impl="torch" materialises the logits (fine for small vocabularies); impl="fused" runs the
    k15.kernels head, which never holds the [tokens x vocab] logits.
    """
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    targets = input_ids[:, 1:]
    temperature = temperature if temperature > 0 else 1.0
    if impl == "fused":
        from k15.kernels import fused_logprobs

        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=positions).last_hidden_state[:, :-1]
        flat = fused_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.lm_head.weight,
                              targets.reshape(-1), temperature=temperature)
        return flat.view_as(targets)
    if impl != "torch":
        raise ValueError(f"trainer.logprob_impl must be 'torch' or 'fused', got {impl!r}")
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, targets[..., None])[..., 0]


def pad_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
    """Right-pad prompt+response rows. Returns input_ids, attention_mask and response_mask, where
    response_mask[b, t] marks that input_ids[b, t+1] is a response token (aligned with logp)."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    response = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention[b, :len(s)] = 1
        response[b, len(p) - 1:len(s) - 1] = True
    return input_ids, attention, response
