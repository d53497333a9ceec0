"""Sequence packing: whole samples concatenated into micro-batches of a fixed token budget.

A micro-batch is one row of documents (prompt + response of one sample each) with no padding
between them. Position ids restart at 0 for every document, which is how the model keeps attention
inside each document: the batch carries its documents' bounds (`cu_seqlens`, made here on the host)
for the packed attention (k15/models/attention.py). Bins are filled first-fit decreasing, so micro-batch
counts follow the token count of the batch (dynamic batch size), and every rank of a data-parallel
trainer gets the same number of micro-batches, balanced by tokens (FSDP's collectives need equal
step counts on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Sample:
    """One sequence to train on: `tokens` is prompt + response; `trained[t]` says whether the loss
    takes the prediction of tokens[t + 1] (len(tokens) - 1 entries); `seq_id` is the sample's row
    in the batch (its reward)."""

    tokens: list[int]
    trained: list[bool]
    seq_id: int

    def __post_init__(self):
        if len(self.trained) != len(self.tokens) - 1:
            raise ValueError(f"sample {self.seq_id}: {len(self.tokens)} tokens need {len(self.tokens) - 1} "
                             f"trained flags, got {len(self.trained)}")


@dataclass
class PackedBatch:
    """One micro-batch: the token tensors are [T]. targets[t] is the token that follows t in its
    document where the loss takes it, else IGNORE; seq_ids[t] is that target's sample, else -1.
    cu_seqlens (int32) and max_seqlen bound the documents, filler included, for the attention;
    trained_rows (int64) lists the positions whose target the loss takes. Both are made on the
    host, so that a forward needs no device-to-host synchronisation."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    seq_ids: torch.Tensor
    num_documents: int
    cu_seqlens: torch.Tensor
    max_seqlen: int
    trained_rows: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def num_trained(self) -> int:
        return self.trained_rows.numel()

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                           self.seq_ids.to(device), self.num_documents, self.cu_seqlens.to(device), self.max_seqlen,
                           self.trained_rows.to(device))


def document_bounds(lengths: list[int]) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32 [documents + 1]: start of each document, then the row's length) and the
    longest document, from the documents' lengths (on the host: no device synchronisation)."""
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32), max(lengths, default=0)


def plan_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of at most `budget` tokens, first-fit decreasing
    (within 11/9 of the fewest bins possible). Bins come out fullest first."""
    if budget < 1:
        raise ValueError(f"the token budget must be positive, got {budget}")
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        i = too_long[0]
        raise ValueError(f"sample {i} has {lengths[i]} tokens, more than the micro-batch budget of {budget} "
                         f"(trainer.micro_batch_tokens); {len(too_long)} sample(s) are too long")
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [bins[b] for b in sorted(range(len(bins)), key=lambda b: room[b])]


def pack(samples: list[Sample], budget: int, pad_id: int, pad_to_budget: bool = False) -> list[PackedBatch]:
    """Micro-batches of at most `budget` tokens holding every sample whole. pad_to_budget fills each
    one up to exactly `budget` with an untrained filler document, so that compiled attention sees
    one shape (FlexAttention recompiles for every new length)."""
    micro = []
    for members in plan_bins([len(s.tokens) for s in samples], budget):
        docs = [samples[i] for i in members]
        used = sum(len(d.tokens) for d in docs)
        filler = budget - used if pad_to_budget else 0
        micro.append(_concatenate(docs, filler, pad_id))
    return micro


def _concatenate(docs: list[Sample], filler: int, pad_id: int) -> PackedBatch:
    ids, pos, tgt, seq = [], [], [], []
    for d in docs:
        n = len(d.tokens)
        ids += d.tokens
        pos += range(n)
        tgt += [t if keep else IGNORE for t, keep in zip(d.tokens[1:], d.trained)] + [IGNORE]
        seq += [d.seq_id if keep else -1 for keep in d.trained] + [-1]
    ids += [pad_id] * filler
    pos += range(filler)
    tgt += [IGNORE] * filler
    seq += [-1] * filler
    long = dict(dtype=torch.long)
    bounds = document_bounds([len(d.tokens) for d in docs] + [filler] * (filler > 0))
    seq_ids = torch.tensor(seq, **long)
    return PackedBatch(torch.tensor(ids, **long), torch.tensor(pos, **long), torch.tensor(tgt, **long),
                       seq_ids, len(docs), *bounds, (seq_ids >= 0).nonzero().squeeze(1))


def empty_like(batch: PackedBatch) -> PackedBatch:
    """A micro-batch of the same length that trains nothing: what a rank with fewer micro-batches
    runs so that every rank takes part in the same collectives."""
    n = batch.num_tokens
    return PackedBatch(torch.zeros(n, dtype=torch.long), torch.arange(n), torch.full((n,), IGNORE),
                       torch.full((n,), -1), 0, *document_bounds([n]), torch.zeros(0, dtype=torch.long))


def split_for_ranks(batches: list[PackedBatch], world_size: int, rank: int) -> list[PackedBatch]:
    """This rank's share: micro-batches dealt greedily to the rank with the fewest tokens so far
    (largest first), every rank topped up with empty ones to the same count."""
    if not batches:
        return []
    load, mine, count = [0] * world_size, [], [0] * world_size
    for b in sorted(batches, key=lambda b: -b.num_tokens):
        r = min(range(world_size), key=lambda r: (load[r], r))
        load[r] += b.num_tokens
        count[r] += 1
        if r == rank:
            mine.append(b)
    return mine + [empty_like(batches[0])] * (max(count) - count[rank])


def padding_waste(lengths: list[int], budget: int) -> float:
    """Share of the micro-batches' token slots that hold no sample, packed into `budget`-token bins."""
    bins = plan_bins(lengths, budget)
    return 1.0 - sum(lengths) / (len(bins) * budget)
