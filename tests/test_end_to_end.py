"""A few real iterations through Ray actors: warm-up, partial rollouts, training, weight sync."""

import json

import pytest

from k15.cli import main


@pytest.mark.slow
def test_k15_train_runs_a_few_iterations(tmp_path):
    run_dir = tmp_path / "run"
    rc = main(["train", "logger=none", f"run_dir={run_dir}", "algo.num_iters=3", "algo.prompts_per_iter=8",
               "algo.samples_per_prompt=4", "trainer.warmup_steps=30", "data.eval_size=32", "data.train_size=500",
               "rollout.token_budget=300", "rollout.max_response_tokens=48"])
    assert rc == 0
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in records if "reward" in r and "iter" in r]
    assert [r["iter"] for r in iters] == [1, 2, 3]
    assert all(r["version"] == r["iter"] for r in iters)
    assert any(r["resumed_fraction"] > 0 for r in iters), "the token budget should have split some samples"
    evals = [r for r in records if "eval_accuracy" in r]
    assert len(evals) == 2 and all(0.0 <= e["eval_accuracy"] <= 1.0 for e in evals)
    assert (run_dir / "training.png").stat().st_size > 0
    summary = [r for r in records if r.get("summary")][0]
    assert summary["trained_samples"] == 3 * 8 * 4


@pytest.mark.slow
def test_recipe_switches_reach_the_loop(tmp_path):
    """Prioritized sampling, the warmed-up length penalty and GRPO through the real actors; the
    checkpoint holds the policy and the sampler's success rates."""
    run_dir = tmp_path / "run"
    rc = main(["train", "logger=none", f"run_dir={run_dir}", "algo=grpo", "algo.num_iters=3",
               "algo.prompts_per_iter=4", "algo.samples_per_prompt=4", "algo.length_penalty.weight=0.5",
               "algo.length_penalty.start_iter=2", "sampler=prioritized", "trainer.warmup_steps=20",
               "data.eval_size=16", "data.train_size=50", "rollout.max_response_tokens=32", "eval_before=false"])
    assert rc == 0
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in records if "reward" in r and "iter" in r]
    assert [r["length_penalty_weight"] for r in iters] == [0.0, 0.5, 0.5]
    state = json.loads((run_dir / "checkpoint" / "sampler.json").read_text())
    assert state["name"] == "prioritized"
    assert len(state["success_rates"]) >= 4 and all(0.0 <= s <= 1.0 for s in state["success_rates"].values())
    assert (run_dir / "checkpoint" / "config.json").is_file()


@pytest.mark.slow
def test_a_relative_run_dir_gets_the_trainers_files(tmp_path, monkeypatch):
    """The trainer's Ray Train workers run in a directory of their own: a run_dir relative to where
    `k15 train` started must still receive their checkpoint shards and the final policy, and a
    relative model.path must still be found by them."""
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "logger=none", "run_dir=rel/run", "algo.num_iters=1", "algo.prompts_per_iter=2",
               "algo.samples_per_prompt=2", "trainer.warmup_steps=2", "data.train_size=20", "data.eval_size=4",
               "rollout.max_response_tokens=16", "eval_before=false", "eval_after=false", "checkpoint.every=1"])
    assert rc == 0
    run = tmp_path / "rel" / "run"
    assert (run / "checkpoints" / "iter_000001" / "shards" / ".metadata").is_file()
    assert (run / "checkpoints" / "iter_000001" / "model" / "model.safetensors").is_file()
    assert (run / "checkpoint" / "model.safetensors").is_file() and (run / "checkpoint" / "sampler.json").is_file()
    # and a relative model.path reaches them too: training on from that policy
    rc = main(["train", "logger=none", "run_dir=rel/run2", "model.path=rel/run/checkpoint", "algo.num_iters=1",
               "algo.prompts_per_iter=2", "algo.samples_per_prompt=2", "trainer.warmup_steps=0", "data.train_size=20",
               "data.eval_size=4", "rollout.max_response_tokens=16", "eval_before=false", "eval_after=false"])
    assert rc == 0 and (tmp_path / "rel" / "run2" / "checkpoint" / "model.safetensors").is_file()
