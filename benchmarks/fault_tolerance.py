"""What a killed process costs a `k15 train` run: time to notice, time to recover, samples lost.

    python benchmarks/fault_tolerance.py --out runs/fault

Runs one unkilled baseline, then the same run (same seed, deterministic mode) five times with one
kind of process SIGKILLed after iteration `--kill-after`: a rollout actor mid-wave, a reward actor
mid-scoring, the trainer mid-step, and the whole run (driver and its local Ray, then
`k15 train resume=`). Log lines are timestamped as they appear, so "noticed" is the time from the
kill to the first line that reports it. Prints a markdown table; results in <out>/fault.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from k15 import procs

ARGS = ["logger=none", "algo.prompts_per_iter=8", "algo.samples_per_prompt=4", "trainer.warmup_steps=20",
        "data.train_size=400", "data.eval_size=16", "rollout.num_workers=2", "rollout.token_budget=200",
        "rollout.max_response_tokens=64", "eval_before=false", "eval_after=false", "algo.length_penalty.weight=0.5",
        "checkpoint.every=1", "checkpoint.keep=3", "deterministic=true"]

# kind: (busy method to kill, or None for the whole run; the log line that says it was noticed)
KILLS = {
    "rollout actor": ("RolloutActor.rollout", "re-queued"),
    "reward actor": ("RewardActor.score", "actor watch: RewardActor"),
    "trainer": ("Trainer.train_iteration", "the trainer died"),
    "whole run": (None, None),
}


class Run:
    """`k15 train` in a session of its own, its output lines timestamped as they arrive."""

    def __init__(self, args: list[str], log: Path):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "k15.cli", "train", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.start = time.monotonic()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def poll(self) -> bool:
        """False once the run has ended."""
        return self.proc.poll() is None

    def first(self, text: str, after: float = 0.0) -> float | None:
        return next((t for t, line in self.lines if t >= after and text in line), None)

    def iterations(self) -> int:
        return sum(line.startswith("iter ") for _, line in list(self.lines))

    def wait(self) -> int:
        self.proc.wait()
        self.reader.join()
        self.log.write_text("".join(line for _, line in self.lines))
        return self.proc.returncode


def trained_ids(run_dir: Path) -> list[list[str]]:
    return [json.loads(line)["sample_ids"] for line in (run_dir / "trained_samples.jsonl").read_text().splitlines()]


def run_with_kill(kind: str, run_dir: Path, iters: int, kill_after: int) -> dict:
    method, noticed_text = KILLS[kind]
    run = Run([*ARGS, f"algo.num_iters={iters}", f"run_dir={run_dir}"], run_dir.with_suffix(".log"))
    killed_at = None
    while run.poll() and killed_at is None:
        if run.iterations() >= kill_after:
            if method is None:
                procs.kill_session(run.proc.pid)
                killed_at = time.monotonic()
            elif (pid := procs.busy_actor(run.proc.pid, method)) is not None:
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
        time.sleep(0.002)
    rc = run.wait()
    out = {"kind": kind, "killed": killed_at is not None}
    if method is None:  # the whole run: resume it
        resumed = Run([f"resume={run_dir}"], run_dir.with_name(run_dir.name + "-resume.log"))
        rc = resumed.wait()
        first_iter = resumed.first("iter ")
        out["resume_to_first_iteration_s"] = first_iter - resumed.start if first_iter else None
        run = resumed
    else:
        noticed = run.first(noticed_text, after=killed_at or 0)
        out["noticed_s"] = noticed - killed_at if noticed and killed_at else None
        watch = run.first("actor watch:", after=killed_at or 0)
        out["watch_s"] = watch - killed_at if watch and killed_at else None
        after = [t for t, line in run.lines if line.startswith("iter ") and killed_at and t > killed_at]
        out["kill_to_next_iteration_s"] = after[0] - killed_at if after else None
    out["rc"] = rc
    out["wall_s"] = time.monotonic() - run.start if method else None
    return out


def hash_rate_mb_s(size_mb: int = 512) -> float:
    """sha256 throughput: the manifest check's cost per MiB of checkpoint."""
    data = os.urandom(1 << 20) * size_mb
    start = time.perf_counter()
    hashlib.sha256(data).hexdigest()
    return size_mb / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("runs/fault"))
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--kill-after", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    base_dir = args.out / "baseline"
    base = Run([*ARGS, f"algo.num_iters={args.iters}", f"run_dir={base_dir}"], args.out / "baseline.log")
    if base.wait() != 0:
        sys.exit(f"the baseline run failed; see {args.out / 'baseline.log'}")
    want = trained_ids(base_dir)
    records = [json.loads(line) for line in (base_dir / "metrics.jsonl").read_text().splitlines()]
    iter_s = sorted(r["iter_seconds"] for r in records if "iter_seconds" in r)
    saves = [r for r in records if "checkpoint_seconds" in r]
    results = {"baseline": {"median_iteration_s": iter_s[len(iter_s) // 2],
                            "checkpoint_s": sum(r["checkpoint_seconds"] for r in saves) / len(saves),
                            "checkpoint_mib": saves[-1]["checkpoint_mb"], "sha256_mib_s": hash_rate_mb_s()},
               "kills": []}
    for i, kind in enumerate(KILLS):
        run_dir = args.out / f"kill-{i}"
        r = run_with_kill(kind, run_dir, args.iters, args.kill_after)
        got = trained_ids(run_dir)
        flat = [s for ids in got for s in ids]
        r["duplicates"] = len(flat) - len(set(flat))
        r["same_samples_as_unkilled"] = got == want
        results["kills"].append(r)
        print(json.dumps(r), flush=True)
    (args.out / "fault.json").write_text(json.dumps(results, indent=1))

    b = results["baseline"]
    print(f"\nbaseline: median iteration {b['median_iteration_s']:.2f}s; checkpoint {b['checkpoint_mib']:.1f} MiB "
          f"in {b['checkpoint_s']:.2f}s; sha256 {b['sha256_mib_s']:.0f} MiB/s\n")
    print("| killed (SIGKILL) | run finished | noticed after | actor watch after | kill to next iteration "
          "| resume to first iteration | duplicates | same samples as unkilled |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["kills"]:
        s = lambda k: "-" if r.get(k) is None else f"{r[k]:.2f}s"  # noqa: E731
        print(f"| {r['kind']} | {'yes' if r['rc'] == 0 else 'NO'} | {s('noticed_s')} | {s('watch_s')} | "
              f"{s('kill_to_next_iteration_s')} | {s('resume_to_first_iteration_s')} | {r['duplicates']} | "
              f"{'yes' if r['same_samples_as_unkilled'] else 'NO'} |")


if __name__ == "__main__":
    main()
