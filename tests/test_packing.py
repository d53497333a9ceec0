"""Sequence packing (k15.trainer.packing): layout, targets, first-fit decreasing, the split across
data-parallel ranks, and the property the trainer relies on: a packed forward of a Hugging Face
model gives every document the logits it gets alone (document masking from position ids)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest
import torch

from k15.trainer.packing import (IGNORE, PackedBatch, Sample, empty_like, pack, padding_waste, plan_bins,
                                 split_for_ranks)

BASE = 100_000  # token value of sample i, offset j: (i + 1) * BASE + j (unique, never the pad id)
PAD = 7


def unique_samples(lengths, rng: random.Random, p_trained=0.7, seq_id=lambda i: 3 * i + 5):
    """Samples whose tokens say which sample and offset they are; random `trained` flags."""
    return [Sample(tokens=[(i + 1) * BASE + j for j in range(n)],
                   trained=[rng.random() < p_trained for _ in range(n - 1)], seq_id=seq_id(i))
            for i, n in enumerate(lengths)]


def long_tail(rng: random.Random, n: int, budget: int, median: float = 60.0, sigma: float = 1.2) -> list[int]:
    return [min(budget, max(1, int(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def layout(batch: PackedBatch):
    """[(sample index, start, length)] of each run of one sample's tokens, read from the token values
    alone (not from position ids); the rest must be the pad id."""
    runs, ids = [], batch.input_ids.tolist()
    t = 0
    while t < len(ids):
        if ids[t] == PAD:
            t += 1
            continue
        i = ids[t] // BASE - 1
        start = t
        while t < len(ids) and ids[t] != PAD and ids[t] // BASE - 1 == i:
            t += 1
        runs.append((i, start, t - start))
    return runs


def check_tensors(b: PackedBatch):
    n = b.input_ids.shape
    for x in (b.input_ids, b.position_ids, b.targets, b.seq_ids):
        assert x.dtype == torch.long and x.dim() == 1 and x.shape == n


# -- layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pad_to_budget", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_every_sample_once_whole_and_contiguous(seed, pad_to_budget):
    rng = random.Random(seed)
    budget = 256
    lengths = long_tail(rng, 120, budget) + [1, 1, budget, budget - 1, 2]  # edge lengths too
    samples = unique_samples(lengths, rng)
    batches = pack(samples, budget, PAD, pad_to_budget=pad_to_budget)

    seen = Counter()
    for b in batches:
        check_tensors(b)
        assert b.num_tokens <= budget
        if pad_to_budget:
            assert b.num_tokens == budget
        runs = layout(b)
        assert b.num_documents == len(runs)
        for i, start, n in runs:
            seen[i] += 1
            assert n == len(samples[i].tokens), f"sample {i} split or cut: {n} of {len(samples[i].tokens)}"
            assert b.input_ids[start:start + n].tolist() == samples[i].tokens
        used = sum(n for _, _, n in runs)
        filler = b.num_tokens - used
        if not pad_to_budget:
            assert filler == 0
        else:
            # The filler is one trailing block of pad ids that trains nothing.
            assert b.input_ids[used:].eq(PAD).all()
            assert b.targets[used:].eq(IGNORE).all()
            assert b.seq_ids[used:].eq(-1).all()
            assert all(start + n <= used for _, start, n in runs)
    assert seen == Counter(range(len(samples))), "every sample exactly once"
    assert sum(b.num_documents for b in batches) == len(samples)


@pytest.mark.parametrize("pad_to_budget", [False, True])
def test_position_ids_restart_per_document(pad_to_budget):
    rng = random.Random(1)
    budget = 200
    samples = unique_samples(long_tail(rng, 80, budget) + [1, 1, 1], rng)
    for b in pack(samples, budget, PAD, pad_to_budget=pad_to_budget):
        pos = b.position_ids.tolist()
        runs = layout(b)
        for _, start, n in runs:
            assert pos[start:start + n] == list(range(n))
        used = sum(n for _, _, n in runs)
        if used < b.num_tokens:  # the filler: its own document from 0
            assert pos[used:] == list(range(b.num_tokens - used))
        # Each new document starts at 0 exactly where the token values change sample.
        starts = {start for _, start, _ in runs} | ({used} if used < b.num_tokens else set())
        assert {t for t, p in enumerate(pos) if p == 0} == starts
        for t in range(1, len(pos)):
            assert pos[t] == 0 or pos[t] == pos[t - 1] + 1
        # The attention's document bounds (made on the host) are where the positions restart.
        assert b.cu_seqlens.dtype == torch.int32
        assert b.cu_seqlens.tolist() == sorted(starts) + [b.num_tokens]
        bounds = b.cu_seqlens.tolist()
        assert b.max_seqlen == max(end - start for start, end in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("p_trained", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("pad_to_budget", [False, True])
def test_targets_and_seq_ids(p_trained, pad_to_budget):
    rng = random.Random(2)
    budget = 128
    samples = unique_samples(long_tail(rng, 60, budget, median=30) + [1], rng, p_trained=p_trained)
    total_trained = 0
    for b in pack(samples, budget, PAD, pad_to_budget=pad_to_budget):
        tgt, seq, ids = b.targets.tolist(), b.seq_ids.tolist(), b.input_ids.tolist()
        expected_tgt = [IGNORE] * b.num_tokens
        expected_seq = [-1] * b.num_tokens
        for i, start, n in layout(b):
            s = samples[i]
            for j in range(n - 1):
                if s.trained[j]:
                    expected_tgt[start + j] = s.tokens[j + 1]
                    expected_seq[start + j] = s.seq_id
        assert tgt == expected_tgt
        assert seq == expected_seq
        # seq_ids agree with targets, and a target is always the next token of the same document.
        for t in range(b.num_tokens):
            assert (seq[t] >= 0) == (tgt[t] != IGNORE)
            if tgt[t] != IGNORE:
                assert t + 1 < b.num_tokens and tgt[t] == ids[t + 1]
                assert b.position_ids[t + 1] == b.position_ids[t] + 1
        assert b.num_trained == sum(x >= 0 for x in seq)
        assert b.trained_rows.tolist() == [t for t in range(b.num_tokens) if tgt[t] != IGNORE]
        total_trained += b.num_trained
    assert total_trained == sum(sum(s.trained) for s in samples)


# -- errors ---------------------------------------------------------------------------------------

def test_sample_longer_than_budget_is_named():
    rng = random.Random(3)
    lengths = [10, 20, 5, 65, 30, 70]
    samples = unique_samples(lengths, rng)
    with pytest.raises(ValueError, match=r"sample 3 .*trainer\.micro_batch_tokens"):
        pack(samples, 64, PAD)
    with pytest.raises(ValueError, match=r"sample 3 .*trainer\.micro_batch_tokens.*2 sample"):
        plan_bins(lengths, 64)
    with pytest.raises(ValueError):
        plan_bins([1, 2], 0)
    assert len(plan_bins(lengths, 70)) >= 1  # exactly the budget fits


@pytest.mark.parametrize("trained", [[True] * 3, [True], [], [False] * 10])
def test_sample_with_wrong_trained_length_raises(trained):
    with pytest.raises(ValueError, match="trained"):
        Sample(tokens=[1, 2, 3], trained=trained, seq_id=0)
    Sample(tokens=[1, 2, 3], trained=[True, False], seq_id=0)  # the right length is fine
    Sample(tokens=[1], trained=[], seq_id=0)


# -- first-fit decreasing -------------------------------------------------------------------------

def check_partition(lengths, bins, budget):
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(0 < load <= budget for load in loads)
    assert loads == sorted(loads, reverse=True), "bins come out fullest first"
    return loads


@pytest.mark.parametrize("seed", range(8))
def test_ffd_within_11_9_of_the_volume_bound_on_long_tails(seed):
    rng = random.Random(seed)
    budget = 4096
    lengths = long_tail(rng, 600, budget, median=rng.choice([100, 300, 800]), sigma=rng.uniform(0.8, 1.5))
    bins = plan_bins(lengths, budget)
    check_partition(lengths, bins, budget)
    lower = math.ceil(sum(lengths) / budget)
    assert len(bins) <= lower * 11 / 9 + 1
    assert padding_waste(lengths, budget) == pytest.approx(1 - sum(lengths) / (len(bins) * budget))


def optimal_bins(lengths, budget):
    """The fewest bins, by dynamic programming over subsets (small inputs only)."""
    n = len(lengths)
    load = [sum(lengths[i] for i in range(n) if m >> i & 1) for m in range(1 << n)]
    best = [math.inf] * (1 << n)
    best[0] = 0
    for m in range(1, 1 << n):
        low = m & -m  # the bin holding the lowest item of m: any subset of m containing it that fits
        rest = m ^ low
        sub = rest
        while True:
            s = sub | low
            if load[s] <= budget:
                best[m] = min(best[m], best[m ^ s] + 1)
            if sub == 0:
                break
            sub = (sub - 1) & rest
    return best[(1 << n) - 1]


def first_fit_decreasing(lengths, budget):
    """An independent FFD: the number of bins it opens."""
    room = []
    for n in sorted(lengths, reverse=True):
        for k, r in enumerate(room):
            if n <= r:
                room[k] -= n
                break
        else:
            room.append(budget - n)
    return len(room)


@pytest.mark.parametrize("seed", range(30))
def test_ffd_against_the_optimum_on_small_inputs(seed):
    rng = random.Random(100 + seed)
    budget = 100
    lengths = [rng.randint(1, budget) for _ in range(rng.randint(1, 9))]
    bins = plan_bins(lengths, budget)
    check_partition(lengths, bins, budget)
    assert len(bins) == first_fit_decreasing(lengths, budget)
    assert len(bins) <= 11 / 9 * optimal_bins(lengths, budget) + 6 / 9


def test_plan_bins_empty_and_single():
    assert plan_bins([], 10) == []
    assert plan_bins([10], 10) == [[0]]


# -- data-parallel split --------------------------------------------------------------------------

def is_empty(b: PackedBatch) -> bool:
    return b.num_documents == 0 and b.seq_ids.eq(-1).all().item() and b.targets.eq(IGNORE).all().item()


@pytest.mark.parametrize("pad_to_budget", [False, True])
@pytest.mark.parametrize("num_samples", [1, 3, 40, 150])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_split_for_ranks(world_size, num_samples, pad_to_budget):
    rng = random.Random(world_size * 1000 + num_samples)
    budget = 256
    lengths = [max(2, n) for n in long_tail(rng, num_samples, budget)]  # 2+ tokens: something to train
    samples = unique_samples(lengths, rng, p_trained=1.0)
    batches = pack(samples, budget, PAD, pad_to_budget=pad_to_budget)
    longest = max(b.num_tokens for b in batches)
    shares = [split_for_ranks(batches, world_size, r) for r in range(world_size)]

    assert len({len(s) for s in shares}) == 1, "every rank runs the same number of micro-batches"
    assert len(shares[0]) == math.ceil(len(batches) / world_size) or not pad_to_budget
    real = [[b for b in s if any(b is x for x in batches)] for s in shares]
    got = sorted(id(b) for r in real for b in r)
    assert got == sorted(id(b) for b in batches), "each micro-batch on exactly one rank"
    for share, mine in zip(shares, real):
        for b in share:
            if not any(b is x for x in mine):
                check_tensors(b)
                assert is_empty(b)
                assert b.num_tokens == longest
                assert b.position_ids.tolist() == list(range(longest))
            else:
                assert b.num_trained > 0  # p_trained=1: every real micro-batch trains something
    loads = [sum(b.num_tokens for b in mine) for mine in real]
    assert sum(loads) == sum(b.num_tokens for b in batches)
    assert max(loads) - min(loads) <= longest
    # Sharper, what dealing largest first to the least loaded rank guarantees: the fullest rank was
    # the least loaded when it got its last (smallest) micro-batch.
    fullest = max(range(world_size), key=lambda r: loads[r])
    assert max(loads) - min(loads) <= min(b.num_tokens for b in real[fullest])


def test_split_for_ranks_order_of_input_does_not_matter_for_coverage():
    rng = random.Random(5)
    batches = pack(unique_samples(long_tail(rng, 90, 300), rng), 300, PAD)
    shuffled = batches[:]
    rng.shuffle(shuffled)
    for world_size in (2, 3):
        shares = [split_for_ranks(shuffled, world_size, r) for r in range(world_size)]
        real = [id(b) for s in shares for b in s if any(b is x for x in batches)]
        assert sorted(real) == sorted(map(id, batches))
        assert len({len(s) for s in shares}) == 1
    assert split_for_ranks([], 4, 2) == []


def test_empty_like():
    rng = random.Random(6)
    b = pack(unique_samples([30, 20], rng), 64, PAD, pad_to_budget=True)[0]
    e = empty_like(b)
    check_tensors(e)
    assert e.num_tokens == b.num_tokens == 64 and is_empty(e) and e.num_trained == 0
    assert e.cu_seqlens.tolist() == [0, 64] and e.max_seqlen == 64 and e.trained_rows.numel() == 0


# -- the packed forward -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


def logits(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None], position_ids=pos[None], use_cache=False).logits[0]


@pytest.mark.parametrize("pad_to_budget", [False, True])
def test_packed_forward_equals_each_document_alone(tiny_qwen2, pad_to_budget):
    rng = random.Random(7)
    budget, pad_id = 96, 0
    lengths = [rng.randint(1, 40) for _ in range(14)] + [1, 1, 2]
    samples = [Sample(tokens=[rng.randrange(1, 256) for _ in range(n)], trained=[True] * (n - 1), seq_id=i)
               for i, n in enumerate(lengths)]
    batches = pack(samples, budget, pad_id, pad_to_budget=pad_to_budget)
    assert any(b.num_documents >= 3 for b in batches)

    found = Counter()
    for b in batches:
        packed = logits(tiny_qwen2, b.input_ids, b.position_ids)
        assert packed.shape == (b.num_tokens, 256)
        # Documents by the position ids (their correctness is tested above); every one matches a
        # sample or is the trailing filler, and gets the logits it gets alone.
        starts = [t for t in range(b.num_tokens) if b.position_ids[t] == 0] + [b.num_tokens]
        for a, z in itertools.pairwise(starts):
            doc = b.input_ids[a:z]
            alone = logits(tiny_qwen2, doc, torch.arange(z - a))
            torch.testing.assert_close(packed[a:z], alone, atol=1e-5, rtol=0)
            matches = [s.seq_id for s in samples if s.tokens == doc.tolist()]
            if matches:
                found[tuple(doc.tolist())] += 1
            else:
                assert pad_to_budget and z == b.num_tokens and doc.eq(pad_id).all()
        if pad_to_budget:
            assert b.num_tokens == budget
    assert found == Counter(tuple(s.tokens) for s in samples)

    # Control: the same rows with one running position (no document boundaries) do attend across
    # documents, so the comparison above can tell.
    b = max(batches, key=lambda b: b.num_documents)
    n0 = layout_first_doc_length(b)
    crossed = logits(tiny_qwen2, b.input_ids, torch.arange(b.num_tokens))
    alone = logits(tiny_qwen2, b.input_ids[n0:], torch.arange(b.num_tokens - n0))
    assert (crossed[n0:] - alone).abs().max() > 1e-3


def layout_first_doc_length(b: PackedBatch) -> int:
    return next(t for t in range(1, b.num_tokens) if b.position_ids[t] == 0)
