"""Rollout engines against the contract (k15/rollout/engine.py) — resume, budget, stops, log-probs,
weight swaps, sleep — each on the PyTorch engine (CPU, CUDA) and on vLLM; then the PyTorch engine's
own pieces."""

import importlib.util
import itertools
import math
import threading
from contextlib import contextmanager

import pytest
import torch

from k15.models import load_tokenizer
from k15.models.model import build_default_model
from k15.rollout.engine import GenerationRequest, SamplingParams, find_repeat
from k15.rollout.torch_engine import TorchEngine, sample_tokens
from k15.trainer.logprobs import pad_batch, token_logprobs

KINDS = ["torch-cpu", "torch-cuda", "vllm"]
# How close an engine's log-probs come to the trainer's fp32 recomputation on CPU. vLLM's fp32
# attention multiplies in TF32; in bf16 it would need about 0.1.
ATOL = {"torch-cpu": 1e-4, "torch-cuda": 1e-3, "vllm": 2e-2}
VERSIONS = itertools.count(1)  # each weight swap in this module gets a new, higher version
X = 7  # a token that is not EOS


def build_model(eos_token_id: int):
    # Head size 32 suits vLLM's attention kernels; seed 3's greedy paths have no near-ties that
    # another engine's rounding could flip.
    return build_default_model(288, 128, 2, 4, 2, 256, 256, seed=3, eos_token_id=eos_token_id)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def prompts(tok):
    return [tok(f"Q: {i}+{i + 2}-1=?\nA:")["input_ids"] for i in range(6)]


@pytest.fixture(scope="module")
def policy(tok):
    """The policy as the trainer holds it (fp32 on CPU): reference log-probs and the weights that
    put an engine back after a test swapped its weights."""
    return build_model(tok.eos_token_id).eval()


@pytest.fixture(scope="module", params=KINDS)
def any_engine(request, tok, tmp_path_factory):
    """(kind, engine) holding the policy's weights; tests that swap weights put them back."""
    kind = request.param
    if kind == "torch-cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if kind == "vllm" and not (importlib.util.find_spec("vllm") and torch.cuda.is_available()):
        pytest.skip("needs vllm (pip install -e '.[gpu]') and CUDA")
    if kind == "vllm":
        from k15.rollout.vllm_engine import VllmEngine

        path = tmp_path_factory.mktemp("policy")
        build_model(tok.eos_token_id).save_pretrained(path)
        tok.save_pretrained(path)
        # fp32: greedy decoding stays the same through vLLM's prefill and decode kernels.
        return kind, VllmEngine(str(path), seed=0, dtype="float32", gpu_memory_utilization=0.2,
                                max_model_len=256, enforce_eager=True)
    return kind, TorchEngine(build_model(tok.eos_token_id), tok.eos_token_id, device=kind.removeprefix("torch-"))


def weights_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def forced(model, token: int) -> dict[str, torch.Tensor]:
    """Weights under which the model predicts `token` whatever the context: every layer adds zero to
    the residual stream, every token embeds along one direction and `token` twice as far, and the
    tied LM head scores each token by that component (logits = sqrt(hidden) * embed[:, 0])."""
    weights = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    weights["model.embed_tokens.weight"][:, 0] = 1.0
    weights["model.embed_tokens.weight"][token, 0] = 2.0
    weights["model.norm.weight"].fill_(1.0)
    return weights


@contextmanager
def swapped(eng, policy, weights):
    """Run with `weights`, then give the engine the policy's back."""
    eng.update_weights(weights, next(VERSIONS))
    try:
        yield
    finally:
        eng.update_weights(weights_of(policy), next(VERSIONS))


def test_resumed_segment_continues_exactly_as_one_pass(any_engine, prompts):
    kind, eng = any_engine
    greedy = SamplingParams(temperature=0.0, max_response_tokens=24)
    whole = eng.generate([GenerationRequest(p) for p in prompts], greedy)
    budget = len(prompts) * 7
    first = eng.generate([GenerationRequest(p) for p in prompts],
                         SamplingParams(temperature=0.0, max_response_tokens=24, token_budget=budget))
    assert all(not r.finished and r.finish_reason == "budget" for r in first)
    # The budget is checked after each decoding step, which gives every running row one token.
    assert budget <= sum(len(r.tokens) for r in first) < budget + len(prompts)
    rest = eng.generate([GenerationRequest(p, r.tokens) for p, r in zip(prompts, first)], greedy)
    for w, a, b in zip(whole, first, rest):
        assert a.tokens + b.tokens == w.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs + b.logprobs), torch.tensor(w.logprobs),
                                   atol=ATOL[kind], rtol=0)
        assert b.finished and b.finish_reason in ("eos", "length")


def test_logprobs_are_the_trainers_under_the_temperature(any_engine, prompts, policy, tok):
    kind, eng = any_engine
    res = eng.generate([GenerationRequest(p) for p in prompts],
                       SamplingParams(temperature=0.7, max_response_tokens=12, seed=3))
    ids, att, resp = pad_batch(prompts, [r.tokens for r in res], tok.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(policy, ids, att, 0.7)
    for b, r in enumerate(res):
        torch.testing.assert_close(torch.tensor(r.logprobs), logp[b][resp[b]], atol=ATOL[kind], rtol=0)


def test_length_cap_counts_earlier_segments(any_engine, prompts, policy):
    _, eng = any_engine
    with swapped(eng, policy, forced(policy, X)):
        res = eng.generate([GenerationRequest(prompts[0]), GenerationRequest(prompts[1], [X] * 10),
                            GenerationRequest(prompts[2], [X] * 12)],
                           SamplingParams(temperature=0.0, max_response_tokens=12))
    assert [r.tokens for r in res] == [[X] * 12, [X] * 2, []]
    assert all(r.finished and r.finish_reason == "length" for r in res)


def test_eos_finishes_a_row(any_engine, prompts, policy, tok):
    _, eng = any_engine
    eos = tok.eos_token_id
    with swapped(eng, policy, forced(policy, eos)):
        res = eng.generate([GenerationRequest(prompts[0]), GenerationRequest(prompts[1], [X, X])],
                           SamplingParams(temperature=0.0, max_response_tokens=12))
    assert [r.tokens for r in res] == [[eos], [eos]]
    assert all(r.finished and r.finish_reason == "eos" for r in res)


def test_repeats_stop_a_row_counting_earlier_segments(any_engine, prompts, policy):
    _, eng = any_engine
    with swapped(eng, policy, forced(policy, X)):
        res = eng.generate([GenerationRequest(prompts[0]), GenerationRequest(prompts[1], [X] * 3),
                            GenerationRequest(prompts[2], [X, X, 9])],
                           SamplingParams(temperature=0.0, max_response_tokens=20, repeat_ngram=3, repeat_times=4))
    assert [r.tokens for r in res] == [[X] * 4, [X], [X] * 4]
    assert all(r.finished and r.finish_reason == "repeat" for r in res)


def test_weight_update_changes_version_and_output(any_engine, prompts, policy):
    kind, eng = any_engine
    greedy = SamplingParams(temperature=0.0, max_response_tokens=3)
    before = eng.generate([GenerationRequest(prompts[0])], greedy)[0]
    version = next(VERSIONS)
    eng.update_weights({n: torch.zeros_like(p) for n, p in policy.named_parameters()}, version)
    res = eng.generate([GenerationRequest(prompts[0])], greedy)[0]
    assert eng.version == version and res.versions == [version] * len(res.tokens)
    uniform = -math.log(policy.config.vocab_size)  # all-zero weights: every logit is 0
    assert res.tokens and all(abs(lp - uniform) < 1e-3 for lp in res.logprobs)
    eng.update_weights(weights_of(policy), next(VERSIONS))
    after = eng.generate([GenerationRequest(prompts[0])], greedy)[0]
    assert after.tokens == before.tokens
    torch.testing.assert_close(torch.tensor(after.logprobs), torch.tensor(before.logprobs), atol=ATOL[kind], rtol=0)


def test_weights_swap_between_two_decoding_steps(any_engine, prompts, policy, tok):
    """An update from another thread while generate runs: tokens before the swap carry older
    versions, and the first token tagged with the new one is already the new weights' (forced EOS)."""
    _, eng = any_engine
    eos, version, out = tok.eos_token_id, next(VERSIONS), {}

    def run():
        try:
            out["res"] = eng.generate([GenerationRequest(prompts[0])],
                                      SamplingParams(temperature=0.0, max_response_tokens=200))[0]
        except BaseException as e:  # re-raised below, in the test's thread
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    eng.update_weights(forced(policy, eos), version)
    thread.join()
    eng.update_weights(weights_of(policy), next(VERSIONS))
    if "error" in out:
        raise out["error"]
    res = out["res"]
    assert res.versions == sorted(res.versions) and max(res.versions) <= version
    if version in res.versions:
        assert res.tokens[res.versions.index(version):] == [eos] and res.finish_reason == "eos"
    else:  # the swap came after the last step
        assert res.finish_reason == "length"


def test_sleep_and_wake_keep_the_weights(any_engine, prompts, policy):
    """Also an update that arrives while the engine sleeps (a colocated trainer publishing)."""
    _, eng = any_engine
    requests = [GenerationRequest(p) for p in prompts[:3]]
    greedy = SamplingParams(temperature=0.0, max_response_tokens=8)
    before = eng.generate(requests, greedy)
    eng.sleep()
    version = next(VERSIONS)
    eng.update_weights(weights_of(policy), version)
    eng.wake()
    after = eng.generate(requests, greedy)
    assert [r.tokens for r in after] == [r.tokens for r in before]
    assert all(r.versions == [version] * len(r.tokens) for r in after)


def test_named_parameters_meta_names_the_trainers_weights(any_engine, policy):
    _, eng = any_engine
    meta = eng.named_parameters_meta()
    assert {(name, shape) for name, shape, _ in meta} == {(n, tuple(p.shape)) for n, p in policy.named_parameters()}


def test_vllm_loads_hf_names_into_its_fused_parameters(any_engine, policy):
    kind, eng = any_engine
    if kind != "vllm":
        pytest.skip("vLLM's worker extension")
    before = eng.weights_checksum()[0]  # vLLM's names: qkv_proj, gate_up_proj, ...
    with swapped(eng, policy, {n: torch.zeros_like(p) for n, p in policy.named_parameters()}):
        zeroed = eng.weights_checksum()[0]
    assert all(zeroed[name] != before[name] for name in before)  # every fused parameter was written
    assert eng.weights_checksum()[0] == before  # and the policy's weights came back exactly


# -- the PyTorch engine's own pieces ---------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tok, prompts):
    return TorchEngine(build_model(tok.eos_token_id), tok.eos_token_id), prompts


def test_logprobs_match_the_trainer(engine):
    eng, prompts = engine
    res = eng.generate([GenerationRequest(p) for p in prompts], SamplingParams(temperature=0.7, max_response_tokens=12, seed=3))
    ids, att, resp = pad_batch(prompts, [r.tokens for r in res], eng.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(eng.model, ids, att, 0.7)
    for b, r in enumerate(res):
        torch.testing.assert_close(logp[b][resp[b]], torch.tensor(r.logprobs), atol=1e-4, rtol=0)


def test_weight_update_restores_the_parameters_exactly(engine):
    eng, prompts = engine
    old = weights_of(eng.model)
    eng.update_weights({n: torch.zeros_like(p) for n, p in old.items()}, version=eng.version + 1)
    eng.generate([GenerationRequest(prompts[0])], SamplingParams(temperature=0.0, max_response_tokens=1))
    eng.update_weights(old, version=eng.version + 1)
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
