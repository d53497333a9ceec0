"""`k15 train resume=<run dir>|<checkpoint>|latest`: the config to continue a run with.

A run directory keeps the command-line overrides it was started with (overrides.yaml). A resumed
run composes those again, plus any given now, and the result must agree with the checkpoint's
config except in the settings that do not change what is trained (RESUMABLE).
"""

from __future__ import annotations

from pathlib import Path

import yaml
from omegaconf import OmegaConf

from k15 import checkpoint

OVERRIDES_FILE = "overrides.yaml"

# May differ between the run that saved a checkpoint and the one that resumes it.
RESUMABLE = ("resume", "run_dir", "algo.num_iters", "checkpoint.", "logger.", "cluster.", "rollout.num_workers",
             "rollout.num_threads", "rollout.device", "trainer.num_threads", "trainer.device", "eval_after",
             "eval.", "curate.", "long2short.")


class ResumeError(ValueError):
    pass


def resume_value(overrides: list[str]) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    return values[-1] if values and values[-1] not in ("", "null") else None


def resume_overrides(overrides: list[str]) -> tuple[list[str], Path]:
    """(overrides to compose the resumed run's config from, the checkpoint to resume from)."""
    run_dir, ckpt = checkpoint.resolve(resume_value(overrides))
    saved = run_dir / OVERRIDES_FILE
    original = yaml.safe_load(saved.read_text()) if saved.is_file() else []
    merged: dict[str, str] = {}
    for o in original + [o for o in overrides if not o.startswith("resume=")]:
        merged[o.split("=", 1)[0]] = o  # a later value of the same key wins
    merged["run_dir"], merged["resume"] = f"run_dir={run_dir}", f"resume={ckpt}"
    return list(merged.values()), ckpt


def save_overrides(run_dir: Path, overrides: list[str]) -> None:
    from k15.atomic import atomic_write_text

    kept = [o for o in overrides if not o.startswith(("resume=", "run_dir="))]
    atomic_write_text(run_dir / OVERRIDES_FILE, yaml.safe_dump(kept))


def check_compatible(cfg, ckpt: Path) -> None:
    """A ResumeError naming the first setting that differs from the checkpoint's config."""
    saved_path = ckpt / "config.yaml"
    saved = _flat(OmegaConf.to_container(OmegaConf.load(saved_path)))
    now = _flat(OmegaConf.to_container(cfg))
    for key in sorted(set(saved) & set(now)):  # a setting new in this version of k15 takes its default
        if key.startswith(RESUMABLE) or saved[key] == now[key]:
            continue
        raise ResumeError(f"resume: the config changed incompatibly since the checkpoint ({saved_path}): "
                          f"{key} was {saved[key]!r}, now {now[key]!r}; start a new run, or resume with "
                          f"{key}={saved[key]}")


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) and value else f"{prefix}{key}"))
    return out
