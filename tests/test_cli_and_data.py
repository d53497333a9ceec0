"""Startup errors are one clear line; prompt files are validated row by row."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from k15.cli import ConfigError, compose_config
from k15.data.dataset import DatasetError, load_prompt_file


def run_k15(*args):
    return subprocess.run([sys.executable, "-m", "k15.cli", "train", *args], capture_output=True, text=True, timeout=120)


def test_overrides_reach_the_config():
    cfg = compose_config(["algo.tau=0.05", "rollout.num_workers=2"])
    assert cfg.algo.tau == 0.05 and cfg.rollout.num_workers == 2


@pytest.mark.parametrize("override, needle", [("algo.tuu=1", "tuu"), ("algo.tau=abc", "algo.tau"),
                                              ("rollout.overlap=maybe", "rollout.overlap")])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle):
        compose_config([override])


@pytest.mark.parametrize("args, needle", [
    (["algo.tuu=1"], "tuu"),
    (["model.path=/does/not/exist"], "model directory not found: /does/not/exist"),
])
def test_cli_errors_are_one_line(args, needle):
    proc = run_k15(*args)
    assert proc.returncode == 1
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr


def test_cli_malformed_prompt_file(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1", "answer": "2"}) + "\n{not json\n")
    proc = run_k15(f"data.source={bad}")
    assert proc.returncode == 1 and f"{bad}, row 2" in proc.stderr and "Traceback" not in proc.stderr


def test_jsonl_and_parquet_records(tmp_path):
    rows = [{"prompt": "1+1=?", "answer": 2, "difficulty": 1}, {"prompt": "x", "answer": "\\frac12", "task": "math"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist([{"prompt": "1+1=?", "answer": "2", "difficulty": 1.0}]), tmp_path / "b.parquet")
    a = load_prompt_file(tmp_path / "a.jsonl")
    assert a[0]["answer"] == "2" and a[0]["difficulty"] == 1.0 and a[1]["task"] == "math"
    assert load_prompt_file(tmp_path / "b.parquet")[0]["prompt"] == "1+1=?"


@pytest.mark.parametrize("row, needle", [({"answer": "1"}, "'prompt'"), ({"prompt": "q"}, "'answer'"),
                                         ({"prompt": "q", "answer": "1", "difficulty": "hard"}, "'difficulty'")])
def test_bad_rows_name_file_row_and_field(tmp_path, row, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=rf"bad.jsonl, row 2: field {needle}"):
        load_prompt_file(f)


def test_reward_settings_come_from_the_config():
    from k15.reward.verifiers import RewardConfig

    cfg = compose_config(["reward.sandbox.limits.wall_s=2", "reward.math_timeout_s=1.5"])
    reward = RewardConfig.from_dict(cfg.reward)
    assert reward.sandbox.limits.wall_s == 2 and reward.math_timeout_s == 1.5
    proc = run_k15("+reward.bogus=1")
    assert proc.returncode == 1 and "bogus" in proc.stderr and "Traceback" not in proc.stderr
