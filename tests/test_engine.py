"""The PyTorch rollout engine: resume, budget, stops, log-probs, weight swaps."""

import pytest
import torch

from k15.models import load_tokenizer
from k15.models.model import build_default_model
from k15.rollout.engine import GenerationRequest, SamplingParams, find_repeat
from k15.rollout.torch_engine import TorchEngine, sample_tokens
from k15.trainer.logprobs import pad_batch, token_logprobs


@pytest.fixture(scope="module")
def engine():
    tok = load_tokenizer()
    model = build_default_model(288, 64, 2, 4, 2, 128, 256, seed=1, eos_token_id=tok.eos_token_id)
    prompts = [tok(f"Q: {i}+{i + 2}-1=?\nA:")["input_ids"] for i in range(6)]
    return TorchEngine(model, tok.eos_token_id), prompts


def test_resumed_segment_continues_exactly_as_one_pass(engine):
    eng, prompts = engine
    greedy = SamplingParams(temperature=0.0, max_response_tokens=24)
    whole = eng.generate([GenerationRequest(p) for p in prompts], greedy)
    cut = SamplingParams(temperature=0.0, max_response_tokens=24, token_budget=len(prompts) * 7)
    first = eng.generate([GenerationRequest(p) for p in prompts], cut)
    assert all(not r.finished and r.finish_reason == "budget" for r in first)
    rest = eng.generate([GenerationRequest(p, r.tokens) for p, r in zip(prompts, first)], greedy)
    for w, a, b in zip(whole, first, rest):
        assert a.tokens + b.tokens == w.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs + b.logprobs), torch.tensor(w.logprobs), atol=1e-4, rtol=0)
        assert b.finish_reason in ("eos", "length")


def test_logprobs_match_the_trainer(engine):
    eng, prompts = engine
    res = eng.generate([GenerationRequest(p) for p in prompts], SamplingParams(temperature=0.7, max_response_tokens=12, seed=3))
    ids, att, resp = pad_batch(prompts, [r.tokens for r in res], eng.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(eng.model, ids, att, 0.7)
    for b, r in enumerate(res):
        torch.testing.assert_close(logp[b][resp[b]], torch.tensor(r.logprobs), atol=1e-4, rtol=0)


def test_length_cap_counts_earlier_segments(engine):
    eng, prompts = engine
    res = eng.generate([GenerationRequest(prompts[0], [7] * 10)], SamplingParams(temperature=1.0, max_response_tokens=12, seed=0))
    assert len(res[0].tokens) <= 2 and res[0].finished


def test_weight_update_changes_version_and_output(engine):
    eng, prompts = engine
    params = {n: torch.zeros_like(p) for n, p in eng.model.named_parameters()}
    old = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    eng.update_weights(params, version=5)
    res = eng.generate([GenerationRequest(prompts[0])], SamplingParams(temperature=0.0, max_response_tokens=3))
    assert eng.version == 5 and res[0].versions == [5] * len(res[0].tokens)
    eng.update_weights(old, version=6)
    eng.generate([GenerationRequest(prompts[0])], SamplingParams(temperature=0.0, max_response_tokens=1))
    assert all(torch.equal(p, old[n]) for n, p in eng.model.named_parameters())


def test_repeat_detection():
    assert find_repeat([1, 2, 3, 4, 5, 4, 5, 4, 5, 4, 5], max_ngram=4, times=4)
    assert not find_repeat([1, 2, 3, 4, 5, 4, 5, 4, 5], max_ngram=4, times=4)
    assert not find_repeat([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], max_ngram=4, times=2)
    assert not find_repeat([3, 3, 3, 3], max_ngram=0, times=4)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {sample_tokens(logits, 1.0, 0.7, g)[0].item() for _ in range(200)}
    assert draws == {0, 1}
