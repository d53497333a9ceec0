"""Run checkpoints: atomic saves, the manifest check, retention, `resume=` resolution and the
config check between the saved run and the resumed one."""

import json

import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from k15 import checkpoint
from k15.checkpoint import CheckpointError
from k15.controller import in_draw_order
from k15.resume import ResumeError, check_compatible, resume_overrides, save_overrides


def save(run_dir, it, keep=10, payload=b"weights"):
    with checkpoint.writing(run_dir, it, keep) as tmp:
        (tmp / "model").mkdir()
        (tmp / "model" / "model.safetensors").write_bytes(payload * 100)
        (tmp / "controller.json").write_text(json.dumps({"iteration": it}))
        (tmp / "config.yaml").write_text("seed: 0\n")
    return checkpoint.checkpoints_dir(run_dir) / f"iter_{it:06d}"


def test_a_saved_checkpoint_passes_its_manifest_check(tmp_path):
    path = save(tmp_path, 3)
    assert checkpoint.verified(path) == path
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"model/model.safetensors", "controller.json", "config.yaml"}


def test_truncated_file_is_named_and_the_previous_good_checkpoint_offered(tmp_path):
    good, bad = save(tmp_path, 1), save(tmp_path, 2)
    weights = bad / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:10])
    with pytest.raises(CheckpointError) as err:
        checkpoint.resolve(str(tmp_path))
    assert str(weights) in str(err.value) and "truncated" in str(err.value)
    assert f"resume={good}" in str(err.value)
    assert checkpoint.newest_intact(tmp_path) == good


def test_changed_bytes_of_the_same_size_fail_the_hash(tmp_path):
    path = save(tmp_path, 1)
    f = path / "controller.json"
    f.write_text(f.read_text().replace("1", "7"))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.verified(path)
    with pytest.raises(CheckpointError, match="no older intact checkpoint"):
        checkpoint.verified(path)


def test_a_crash_during_a_save_leaves_no_checkpoint_behind(tmp_path):
    save(tmp_path, 1)
    with pytest.raises(RuntimeError):
        with checkpoint.writing(tmp_path, 2, keep=10) as tmp:
            (tmp / "controller.json").write_text("{}")
            raise RuntimeError("killed mid-save")
    assert [p.name for p in checkpoint.checkpoints_dir(tmp_path).iterdir()] == ["iter_000001"]
    assert checkpoint.resolve(str(tmp_path))[1].name == "iter_000001"


def test_retention_keeps_the_newest(tmp_path):
    for it in range(1, 6):
        save(tmp_path, it, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["iter_000004", "iter_000005"]


def test_resolve_run_dir_checkpoint_dir_and_latest(tmp_path):
    runs = tmp_path / "runs"
    old, new = save(runs / "a", 2), save(runs / "b", 1)
    assert checkpoint.resolve(str(runs / "a")) == (runs / "a", old)
    assert checkpoint.resolve(str(new)) == (runs / "b", new)
    assert checkpoint.resolve("latest", runs_root=runs)[1] == new
    (runs / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        checkpoint.resolve(str(runs / "empty"))
    with pytest.raises(CheckpointError, match="no such directory"):
        checkpoint.resolve(str(runs / "missing"))


def test_resume_composes_the_saved_overrides_then_the_new_ones(tmp_path):
    path = save(tmp_path, 4)
    save_overrides(tmp_path, ["algo.tau=0.05", "algo.num_iters=6", f"run_dir={tmp_path}"])
    overrides, ckpt = resume_overrides([f"resume={tmp_path}", "algo.num_iters=9"])
    assert ckpt == path
    assert overrides == ["algo.tau=0.05", "algo.num_iters=9", f"run_dir={tmp_path}", f"resume={path}"]


def test_an_incompatible_config_change_is_named(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    saved = OmegaConf.create({"algo": {"tau": 0.1, "num_iters": 6}, "logger": {"backend": "wandb"}, "seed": 0})
    (path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    check_compatible(OmegaConf.create({"algo": {"tau": 0.1, "num_iters": 12}, "logger": {"backend": "none"},
                                       "seed": 0}), path)  # longer run, other logger: fine
    with pytest.raises(ResumeError, match=r"algo\.tau was 0\.1, now 0\.05"):
        check_compatible(OmegaConf.create({"algo": {"tau": 0.05, "num_iters": 6}, "seed": 0,
                                           "logger": {"backend": "wandb"}}), path)


def test_groups_are_put_in_draw_order():
    batch = pa.table({"prompt_id": ["p@10", "p@10", "q@9", "q@9"], "sample_idx": [1, 0, 0, 1]})
    ordered = in_draw_order(batch)
    assert ordered["prompt_id"].to_pylist() == ["q@9", "q@9", "p@10", "p@10"]
    assert ordered["sample_idx"].to_pylist() == [0, 1, 0, 1]


def test_k15_train_resume_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    def error_line(*args):
        proc = subprocess.run([sys.executable, "-m", "k15.cli", "train", *args], capture_output=True, text=True,
                              timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("k15: error:"), proc.stderr[-2000:]
        return lines[0]

    assert "no such directory" in error_line(f"resume={tmp_path / 'nope'}")
    from k15.cli import compose_config

    path = save(tmp_path / "run", 2)
    saved = compose_config(["algo.tau=0.3"])
    (path / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    checkpoint.write_manifest(path, 2)  # a consistent checkpoint whose config differs from now
    assert "algo.tau was 0.3, now 0.1" in error_line(f"resume={tmp_path / 'run'}")


def test_a_jsonl_line_cut_short_by_a_kill_is_left_out(tmp_path):
    from k15.metrics import RunLogger, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "reward": 0.5}\n{"iter": 2, "reward": 0.6}\n{"iter": 3, "rew')
    assert [r["iter"] for r in read_jsonl(path)] == [1, 2]
    logger = RunLogger(tmp_path, {}, backend="none", resume_after=1)  # resumed from iteration 1's checkpoint
    assert [r["iter"] for r in logger.history] == [1]
    assert [r["iter"] for r in read_jsonl(path)] == [1]
    path.write_text('{"iter": 1}\n{"ite\n{"iter": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_jsonl(path)
