"""Kill real processes in the middle of `k15 train` runs: a rollout actor, a reward actor, the whole
run (then resume); and resume from a corrupted checkpoint. Every run is in deterministic mode, so
the killed run must train on exactly the samples of the unkilled one, iteration by iteration."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k15 import procs

pytestmark = pytest.mark.slow

ARGS = ["logger=none", "algo.num_iters=6", "algo.prompts_per_iter=4", "algo.samples_per_prompt=4",
        "trainer.warmup_steps=20", "data.train_size=200", "data.eval_size=16", "rollout.num_workers=2",
        "rollout.token_budget=100", "rollout.max_response_tokens=48", "eval_before=false", "eval_after=false",
        "algo.length_penalty.weight=0.5",  # rewards that differ within a group, so every step moves the weights
        "checkpoint.every=1", "checkpoint.keep=3", "deterministic=true"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    """`k15 train` in a session of its own (its local Ray processes too), output to <run_dir>.log."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "k15.cli", "train", *extra], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def finish(proc: subprocess.Popen, run_dir: Path, timeout: float = 600) -> str:
    proc.wait(timeout=timeout)
    out = Path(f"{run_dir}.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300, poll_s: float = 0.005):
    """Poll `condition` (returns a truthy value when met) while the run is alive."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, "the run ended before the moment to kill it came"
        time.sleep(poll_s)
    raise AssertionError("timed out waiting for the moment to kill")


def busy_actor(proc: subprocess.Popen, method: str):
    """The pid of the run's actor process running `method` right now."""
    return procs.busy_actor(proc.pid, method)


def trained(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trained_samples.jsonl").read_text().splitlines()]


def iterations_done(run_dir: Path) -> int:
    path = run_dir / "trained_samples.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_samples(run_dir: Path, baseline: Path) -> None:
    got, want = trained(run_dir), trained(baseline)
    assert [r["iter"] for r in got] == list(range(1, 7))
    ids = [s for r in got for s in r["sample_ids"]]
    assert len(ids) == len(set(ids)) == 6 * 4 * 4, "a sample was trained on twice"
    assert set(ids) == {s for r in want for s in r["sample_ids"]}, "lost or extra samples"
    assert got == want  # and each iteration trained on the same samples in the same order


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("fault") / "baseline"
    finish(start(run_dir, *ARGS, f"run_dir={run_dir}"), run_dir)
    return run_dir


def run_killing(run_dir: Path, method: str, after_iterations: int) -> str:
    """A run whose actor process busy in `method` is SIGKILLed once `after_iterations` are done;
    its output, once it has finished."""
    proc = start(run_dir, *ARGS, f"run_dir={run_dir}")
    wait_until(lambda: iterations_done(run_dir) >= after_iterations, proc)
    os.kill(wait_until(lambda: busy_actor(proc, method), proc), signal.SIGKILL)
    return finish(proc, run_dir)


def test_sigkill_of_a_rollout_actor_mid_wave_loses_and_repeats_nothing(baseline, tmp_path):
    run_dir = tmp_path / "run"
    out = run_killing(run_dir, "RolloutActor.rollout", after_iterations=2)
    assert "re-queued" in out and "rebuilding the weight broadcast group" in out
    assert "restarting from" not in out  # recovered in place, not by going back to a checkpoint
    assert "actor watch: RolloutActor" in out and "died; Ray restarts it" in out
    assert_same_samples(run_dir, baseline)
    summary = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert summary["rollout_failures"] >= 1


def test_sigkill_of_a_reward_actor_mid_scoring_loses_and_repeats_nothing(baseline, tmp_path):
    run_dir = tmp_path / "run"
    out = run_killing(run_dir, "RewardActor.score", after_iterations=2)
    assert "reward actor restarted" in out
    assert "reward_actor_died" not in out and "restarting from" not in out
    assert "actor watch: RewardActor" in out
    assert_same_samples(run_dir, baseline)


def test_sigkill_of_the_trainer_restarts_the_run_from_its_checkpoint(baseline, tmp_path):
    run_dir = tmp_path / "run"
    out = run_killing(run_dir, "Trainer.train_iteration", after_iterations=3)
    assert "the trainer died in iteration" in out and "restarting from" in out
    assert_same_samples(run_dir, baseline)


def test_killed_run_resumes_to_the_same_samples_and_weights(baseline, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir, *ARGS, f"run_dir={run_dir}")
    wait_until(lambda: (run_dir / "checkpoints" / "iter_000003").is_dir(), proc, poll_s=0.05)
    procs.kill_session(proc.pid)  # the driver and its local Ray: a lost node
    proc.wait(timeout=60)
    assert iterations_done(run_dir) < 6, "the run had finished before it was killed"
    out = finish(start(run_dir, f"resume={run_dir}"), run_dir)
    assert "resumed from" in out
    assert_same_samples(run_dir, baseline)
    got, want = load_file(run_dir / "checkpoint" / "model.safetensors"), load_file(baseline / "checkpoint" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records if "reward" in r] == list(range(1, 7)), "an iteration's metrics kept twice"
    assert [r["iter"] for r in records if "checkpoint_seconds" in r] == list(range(1, 7))


def test_corrupt_checkpoint_is_named_and_the_previous_good_one_offered(baseline, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(baseline, run_dir)
    newest, previous = sorted((run_dir / "checkpoints").iterdir())[-1], sorted((run_dir / "checkpoints").iterdir())[-2]
    weights = newest / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a save cut off by a full disk
    proc = subprocess.run([sys.executable, "-m", "k15.cli", "train", f"resume={run_dir}"], capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert str(weights) in lines[0] and "truncated" in lines[0]
    assert f"resume={previous}" in lines[0]
