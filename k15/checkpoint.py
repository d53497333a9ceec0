"""Run checkpoints: everything `k15 train resume=<run dir>` needs to continue a run exactly.

    <run_dir>/checkpoints/iter_000004/
        model/                 the policy (a Hugging Face directory) and its tokenizer
        trainer_state.pt       policy version, RNG states
        buffer/*.parquet       the replay buffer: ready groups, partial groups, unfinished segments,
                               ids of the segments already written (a retried write adds nothing)
        controller.json        iteration, counters, sampler state (curriculum position, success rates)
        config.yaml            the config the run was started with
        MANIFEST.json          size and sha256 of every file above; written last

A checkpoint is filled in a hidden temp directory and renamed into place, so a crash leaves either
the whole checkpoint or none of it. A file that was truncated or changed afterwards fails the
manifest check on resume, and the error names it and the newest checkpoint that is still good.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

MANIFEST = "MANIFEST.json"
PREFIX = "iter_"


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what to do instead."""


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def iteration_of(path: str | Path) -> int:
    return int(Path(path).name.removeprefix(PREFIX))


@contextmanager
def writing(run_dir: str | Path, iteration: int, keep: int) -> Iterator[Path]:
    """Yield an empty temp directory to fill; on success it gets a manifest and becomes
    checkpoints/iter_<iteration>, and all but the newest `keep` checkpoints are deleted."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{iteration:06d}"
    tmp = root / f".tmp-{final.name}-{time.time_ns()}"
    tmp.mkdir()
    try:
        yield tmp
        write_manifest(tmp, iteration)
        if final.exists():  # the same iteration saved again (a resumed run): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prune(root, keep)


def write_manifest(path: Path, iteration: int) -> None:
    files = {str(f.relative_to(path)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(path.rglob("*")) if f.is_file() and f != path / MANIFEST}
    (path / MANIFEST).write_text(json.dumps({"iteration": iteration, "files": files}, indent=1))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prune(root: Path, keep: int) -> None:
    for old in list_checkpoints(root.parent)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temp directories of a crashed save are skipped)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def problem(path: Path) -> str | None:
    """Why the checkpoint at `path` is unusable, naming the file; None if it is intact."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{manifest} is not a valid manifest"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{f} has {f.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or overwritten)"
        if _sha256(f) != want["sha256"]:
            return f"{f} does not match its sha256 in the manifest (corrupted)"
    return None


def verified(path: Path) -> Path:
    """`path` if intact; else a CheckpointError naming the bad file and offering the newest good
    checkpoint older than it."""
    bad = problem(path)
    if bad is None:
        return path
    older = [p for p in list_checkpoints(path.parent.parent) if p.name < path.name]
    good = next((p for p in reversed(older) if problem(p) is None), None)
    offer = (f"; the previous good checkpoint is {good}: resume from it with `k15 train resume={good}`"
             if good else "; no older intact checkpoint exists in this run")
    raise CheckpointError(f"checkpoint {path} is corrupt: {bad}{offer}")


def resolve(resume: str, runs_root: str | Path = "runs") -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for `resume=`: a run directory (its newest checkpoint), one
    checkpoint directory, or `latest` (the newest checkpoint of any run under runs/)."""
    if resume == "latest":
        candidates = [c for run in Path(runs_root).glob("*") if run.is_dir() for c in list_checkpoints(run)[-1:]]
        if not candidates:
            raise CheckpointError(f"resume=latest: no run under {runs_root}/ has a checkpoint")
        path = max(candidates, key=lambda c: (c / MANIFEST).stat().st_mtime if (c / MANIFEST).exists() else 0)
        return path.parent.parent, verified(path)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume={resume}: no such directory")
    if path.name.startswith(PREFIX) and path.parent.name == "checkpoints":
        return path.parent.parent, verified(path)
    found = list_checkpoints(path)
    if not found:
        raise CheckpointError(f"resume={resume}: {checkpoints_dir(path)} holds no checkpoint "
                              f"(set checkpoint.every to save them)")
    return path, verified(found[-1])


BUFFER_TABLES = ("ready", "partial", "unfinished", "seen")


def write_buffer(path: Path, snapshot: dict) -> None:
    """The replay buffer's snapshot (k15.buffer.ReplayBuffer.snapshot) as Parquet files."""
    import pyarrow.parquet as pq

    (path / "buffer").mkdir()
    for name in BUFFER_TABLES:
        pq.write_table(snapshot[name], path / "buffer" / f"{name}.parquet")


def read_buffer(path: Path) -> dict:
    import pyarrow.parquet as pq

    return {name: pq.read_table(path / "buffer" / f"{name}.parquet") for name in BUFFER_TABLES}


def newest_intact(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run that passes the manifest check (None: there is none)."""
    return next((p for p in reversed(list_checkpoints(run_dir)) if problem(p) is None), None)
