"""The embedding example: an agent loop on k15's actors with multi-turn episodes whose tool tokens
are kept in the sequence but masked out of training."""

import importlib.util
from pathlib import Path

import pytest

from k15.schema import ENV_VERSION, append_environment, trained_mask

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_loop.py"


def test_environment_tokens_are_appended_unfinished_and_masked():
    row = {"response_tokens": [5, 6], "logprobs": [-0.1, -0.2], "versions": [3, 3], "length": 2, "finished": True,
           "finish_reason": "eos", "reward": 1.0}
    out = append_environment(row, [7, 8, 9])
    assert out["response_tokens"] == [5, 6, 7, 8, 9] and out["length"] == 5
    assert out["versions"] == [3, 3, ENV_VERSION, ENV_VERSION, ENV_VERSION] and out["logprobs"][2:] == [0.0] * 3
    assert not out["finished"] and out["reward"] is None
    assert trained_mask(out["versions"]) == [True, True, False, False, False]


@pytest.mark.slow
def test_agent_loop_example_trains_on_policy_tokens_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its run directory goes under tmp_path
    spec = importlib.util.spec_from_file_location("agent_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.run(turns=2, overrides=[])
    rows = out["rows"]
    assert len(rows) == 2 * 2 and all(r["finished"] and r["reward"] is not None for r in rows)
    for r in rows:
        assert r["num_segments"] == 2  # two policy turns
        mask = trained_mask(r["versions"])
        env = [t for t, m in zip(r["response_tokens"], mask) if not m]
        assert env, "the tool's tokens are in the sequence"
        assert all(lp == 0.0 for lp, m in zip(r["logprobs"], mask) if not m)
        first_env = mask.index(False)
        assert not any(mask[first_env:first_env + len(env)]), "the tool's tokens are one run"
        assert all(mask[:first_env]) and all(mask[first_env + len(env):]), "policy, tool, policy"
    assert out["env_tokens"] > 0
    assert out["stats"]["trained_tokens"] == out["policy_tokens"]  # the tool's tokens left the loss
    assert out["stats"]["version"] == 1
