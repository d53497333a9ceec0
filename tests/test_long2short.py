"""long2short (paper 2.4): response selection, the DPO loss, merging, and `k15 long2short` end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():  # the fused head's Triton kernels run on CPU in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # (read when Triton is first imported)

from k15.algo.dpo import dpo_loss
from k15.long2short.merge import IncompatibleCheckpoints, check_compatible, merge_checkpoints, merge_state_dicts
from k15.long2short.selection import preference_pairs, shortest_correct


def sample(length, correct=True, finish="eos"):
    return {"length": length, "reward": 1.0 if correct else 0.0, "finish_reason": finish}


# -- which responses teach "shorter" -------------------------------------------------------------
def test_shortest_correct_takes_the_shortest_complete_correct_response():
    rows = [sample(50), sample(12, correct=False), sample(30, finish="length"), sample(40), sample(40)]
    assert shortest_correct(rows) is rows[3]  # 12 is wrong, 30 was cut off; the first of two 40s
    assert shortest_correct([sample(10, correct=False), sample(20, finish="repeat")]) is None


def test_preference_pairs_reject_wrong_and_much_longer_correct_responses():
    rows = [sample(60), sample(40), sample(59), sample(20, correct=False), sample(90, finish="length")]
    pairs = preference_pairs(rows, longer_factor=1.5)
    assert all(chosen is rows[1] for chosen, _ in pairs)
    # 60 = 1.5 x 40 is rejected (at least 1.5x), 59 is not; the wrong one and the truncated 90 are
    assert [r for _, r in pairs] == [rows[0], rows[3], rows[4]]
    assert [r for _, r in preference_pairs(rows, 1.5, max_pairs=2)] == [rows[0], rows[3]]
    assert preference_pairs([sample(5, correct=False)] * 3) == []
    with pytest.raises(ValueError, match="longer_factor"):
        preference_pairs(rows, longer_factor=0.5)


# -- the DPO loss ---------------------------------------------------------------------------------
def test_dpo_loss_matches_its_formula_and_prefers_the_chosen():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.3
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    z = beta * ((pc - rc) - (pr - rr))
    expected = torch.mean(torch.log1p(torch.exp(-z)))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descending raises chosen, lowers rejected
    assert torch.allclose(pc.grad, -beta * torch.sigmoid(-z).detach() / 16)
    assert stats.accuracy == pytest.approx((z > 0).double().mean().item())
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(pc, pr[:3], rc, rr, beta)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pc, pr, rc, rr, 0.0)


def test_dpo_through_the_fused_head_equals_the_plain_head():
    """The DPO loss and its gradient through k15.kernels (Triton interpreter) and through the
    materialised logits agree."""
    pytest.importorskip("triton", reason="needs triton (the interpreter runs the kernels on CPU)")
    from k15.kernels import use_triton
    from k15.trainer.logprobs import pad_batch, token_logprobs

    model = small_model(seed=0)
    prompts, chosen, rejected = [[5, 6, 7], [8, 9]], [[10, 11, 0], [12, 0]], [[13, 14, 15, 16, 0], [17, 18, 0]]
    ids, att, resp = pad_batch(prompts + prompts, chosen + rejected, pad_id=0)
    grads, losses = [], []
    for impl in ("torch", "fused"):
        model.zero_grad()
        logp = token_logprobs(model, ids, att, 1.0, impl)
        seq = (logp * resp).sum(1)
        ref = seq.detach() - 0.1 * torch.arange(4.0)
        loss, _ = dpo_loss(seq[:2], seq[2:], ref[:2], ref[2:], beta=0.5)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert use_triton(ids.float()), "the fused path should run the Triton kernels here"
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


# -- merging ----------------------------------------------------------------------------------------
def small_model(seed, hidden=32):
    from k15.models.model import build_default_model

    return build_default_model(vocab_size=288, hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1,
                               intermediate_size=64, max_position=64, seed=seed, eos_token_id=0)


def save_small(path, seed, hidden=32):
    from k15.models.tokenizer import load_tokenizer

    small_model(seed, hidden).save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def test_merge_state_dicts_is_the_weighted_average():
    a, b = small_model(1).state_dict(), small_model(2).state_dict()
    merged = merge_state_dicts([a, b], [0.25, 0.75])
    assert set(merged) == set(a)
    for key in a:
        assert torch.allclose(merged[key], 0.25 * a[key] + 0.75 * b[key], atol=1e-7)
    with pytest.raises(ValueError, match="sum to 1"):
        merge_state_dicts([a, b], [0.5, 0.6])
    bigger = small_model(3, hidden=64).state_dict()
    with pytest.raises(IncompatibleCheckpoints, match="shapes"):
        merge_state_dicts([a, bigger], [0.5, 0.5])


def test_merge_checkpoints_writes_a_loadable_average(tmp_path):
    from k15.models.model import load_pretrained

    a, b = save_small(tmp_path / "a", 1), save_small(tmp_path / "b", 2)
    out = merge_checkpoints([a, b], [0.7, 0.3], tmp_path / "merged")
    merged, pa, pb = (dict(load_pretrained(p).named_parameters()) for p in (out, a, b))
    for name, value in merged.items():
        assert torch.allclose(value, 0.7 * pa[name] + 0.3 * pb[name], atol=1e-6), name
    assert (out / "tokenizer.json").is_file()


def test_check_compatible_names_the_differing_field(tmp_path):
    a, c = save_small(tmp_path / "a", 1), save_small(tmp_path / "c", 1, hidden=64)
    with pytest.raises(IncompatibleCheckpoints, match="'hidden_size' \\(32 vs 64\\)"):
        check_compatible([a, c])
    with pytest.raises(IncompatibleCheckpoints, match="no config.json"):
        check_compatible([a, tmp_path])


# -- the command --------------------------------------------------------------------------------------
def run_k15(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU runs take the reference path
    return subprocess.run([sys.executable, "-m", "k15.cli", *args], capture_output=True, text=True, timeout=600,
                          env=env)


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("k15: error:")
    return lines[0]


def test_long2short_startup_errors_are_one_line(tmp_path):
    a, c = save_small(tmp_path / "a", 1), save_small(tmp_path / "c", 1, hidden=64)
    assert "method=merge|shortest|dpo|rl" in one_error_line(run_k15("long2short", f"model.path={a}"))
    assert "model.path" in one_error_line(run_k15("long2short", "method=dpo"))
    assert "short_model" in one_error_line(run_k15("long2short", "method=merge", f"model.path={a}"))
    line = one_error_line(run_k15("long2short", "method=merge", f"model.path={a}", f"long2short.short_model={c}"))
    assert "hidden_size" in line and str(c) in line
    assert "long2short.beta" in one_error_line(run_k15("long2short", "method=dpo", f"model.path={a}",
                                                       "long2short.beta=0"))


def test_k15_long2short_merge_end_to_end(tmp_path):
    from k15.models.model import load_pretrained

    a, b = save_small(tmp_path / "a", 1), save_small(tmp_path / "b", 2)
    out = tmp_path / "out"
    proc = run_k15("long2short", "method=merge", f"model.path={a}", f"long2short.short_model={b}",
                   "long2short.merge_weights=[0.6,0.4]", f"long2short.output={out}", "long2short.eval_after=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "k15 long2short method=merge" in proc.stdout
    summary = json.loads((out / "long2short.json").read_text())
    assert summary["weights"] == [0.6, 0.4] and summary["checkpoint"] == str(out / "checkpoint")
    merged, pa, pb = (dict(load_pretrained(p).named_parameters()) for p in (out / "checkpoint", a, b))
    assert all(torch.allclose(v, 0.6 * pa[k] + 0.4 * pb[k], atol=1e-6) for k, v in merged.items())


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory):
    """A policy that gets some one- and two-step problems right: a short supervised warm-up with
    self-checks (the long chain of thought the methods shorten)."""
    run = tmp_path_factory.mktemp("long") / "run"
    proc = run_k15("train", "logger=none", f"run_dir={run}", "algo.num_iters=0", "eval_before=false",
                   "eval_after=false", "trainer.warmup_steps=250", "data.min_ops=1", "data.max_ops=2",
                   "data.cot_fraction=1.0", "data.check_fraction=0.5", "data.train_size=2000")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoint"


SMALL = ["data.min_ops=1", "data.max_ops=2", "data.eval_size=16", "data.train_size=2000", "long2short.problems=24",
         "long2short.steps=4", "long2short.batch_size=4", "rollout.max_response_tokens=64", "logger=none"]


@pytest.mark.slow
@pytest.mark.parametrize("method, data_file", [("shortest", "sft.jsonl"), ("dpo", "dpo_pairs.jsonl")])
def test_k15_long2short_fine_tunes_on_sampled_data(long_checkpoint, tmp_path, method, data_file):
    out = tmp_path / method
    proc = run_k15("long2short", f"method={method}", f"model.path={long_checkpoint}", f"long2short.output={out}",
                   *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out, long policy (greedy)" in proc.stdout and f"held-out, {method} policy (greedy)" in proc.stdout
    summary = json.loads((out / "long2short.json").read_text())
    rows = [json.loads(line) for line in (out / data_file).read_text().splitlines()]
    assert rows and summary["problems"] == 24 and summary["samples"] == 24 * 8
    if method == "shortest":
        assert summary["sft_examples"] == len(rows) <= 24
        assert all(r["length"] > 0 and "boxed" in r["response"] for r in rows)
    else:
        assert summary["dpo_pairs"] == len(rows) and 0.0 <= summary["dpo_pair_accuracy"] <= 1.0
        for r in rows:  # chosen is correct; rejected is wrong or at least 1.5x longer
            assert not r["rejected_correct"] or r["rejected_length"] >= 1.5 * r["chosen_length"]
    assert (out / "checkpoint" / "config.json").is_file() and (out / "checkpoint" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_shortest_in_rounds_samples_each_rounds_policy(long_checkpoint, tmp_path):
    out = tmp_path / "rounds"
    proc = run_k15("long2short", "method=shortest", f"model.path={long_checkpoint}", f"long2short.output={out}",
                   "long2short.rounds=2", "long2short.eval_after=false", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "long2short.json").read_text())
    first, second = summary["rounds"]
    assert first["policy_sampled"] == str(long_checkpoint.resolve())
    assert second["policy_sampled"] == str((out / "round1" / "checkpoint").resolve())
    assert second["checkpoint"] == summary["checkpoint"] == str(out / "checkpoint")
    for r in (1, 2):
        rows = [json.loads(line) for line in (out / f"round{r}" / "sft.jsonl").read_text().splitlines()]
        assert rows and len(rows) == summary["rounds"][r - 1]["sft_examples"]
    assert (out / "round1" / "checkpoint" / "config.json").is_file() and (out / "checkpoint" / "config.json").is_file()


@pytest.mark.slow
def test_k15_long2short_rl_turns_the_length_penalty_on(long_checkpoint, tmp_path):
    out = tmp_path / "rl"
    proc = run_k15("long2short", "method=rl", f"model.path={long_checkpoint}", f"long2short.output={out}",
                   "algo.num_iters=2", "algo.prompts_per_iter=4", "algo.samples_per_prompt=4", "eval_before=false",
                   "rollout.max_response_tokens=40", *SMALL[:4], "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in records if "iter" in r and "reward" in r]
    assert [r["length_penalty_weight"] for r in iters] == [0.5, 0.5]
    assert max(r["p95_length"] for r in iters) <= 40
    assert not any("warmup_loss" in r for r in records)  # starts from the long policy, no SFT
    assert (out / "checkpoint" / "config.json").is_file()


@pytest.mark.slow
def test_untrained_policy_has_nothing_to_learn_from(tmp_path):
    a = save_small(tmp_path / "a", 1)
    proc = run_k15("long2short", "method=shortest", f"model.path={a}", *SMALL[:4], "long2short.problems=2",
                   "long2short.eval_after=false", "logger=none")
    last = proc.stderr.strip().splitlines()[-1]  # after Ray's own start-up lines
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith("k15: error:") and "correct, complete response" in last and str(a) in last
