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
