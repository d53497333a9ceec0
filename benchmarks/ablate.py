"""Ablations of the k1.5 recipe on the built-in task: each switch on and off, curves and a table.

    python benchmarks/ablate.py --out runs/ablate                       # everything, 3 seeds
    python benchmarks/ablate.py --out runs/ablate --only length         # one experiment

All runs start from one shared warm-up checkpoint (the supervised long-CoT warm-up, with the
self-check the length penalty can remove), so the arms differ only in the switch under test:

- length:      length penalty (paper 2.3.3) off / on at two weights, same iterations; each final
               policy is also evaluated sampled (`k15 eval`, 8 samples at temperature 1);
- sampling:    uniform / prioritized (/ curriculum) on a task mix where a quarter of the problems
               are hard, accuracy on the hard quarter after a fixed number of iterations;
- losses:      mirror descent / GRPO (/ REINFORCE) on the built-in task, same budget.

Every run is a real `k15 train` in its own process; finished runs are skipped on a rerun. Results:
<out>/ablations.json, <out>/<experiment>.png, and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WARMUP = ["data.check_fraction=0.7", "rollout.max_response_tokens=128", "trainer.warmup_steps=1200"]
RL_BASE = ["trainer.warmup_steps=0", "rollout.max_response_tokens=128", "logger=none"]

EXPERIMENTS = {
    # name: (iterations, arms {label: overrides}, extra overrides, metric the acceptance reads)
    "length": (80, {"off": [],
                    "w0.35": ["algo.length_penalty.weight=0.35", "algo.length_penalty.start_iter=10"],
                    "w0.5": ["algo.length_penalty.weight=0.5", "algo.length_penalty.start_iter=10"]},
               [], "eval_mean_length"),
    "sampling": (15, {"uniform": ["sampler=uniform"], "prioritized": ["sampler=prioritized"],
                      "curriculum": ["sampler=curriculum", "sampler.switch_iter=6"]},
                 ["data.source={mix}/train.jsonl", "data.eval_source={mix}/eval.jsonl"], "eval_accuracy_d6"),
    "losses": (30, {"mirror_descent": ["algo=mirror_descent"], "grpo": ["algo=grpo"], "reinforce": ["algo=reinforce"]},
               [], "eval_accuracy"),
}


def run_k15(args: list[str], log: Path) -> None:
    """`k15 <args>` in a subprocess with its output in `log`; stops the script if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        rc = subprocess.run(["k15", *args], stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"k15 {args[0]} failed (exit {rc}); see {log}")


def k15_train(overrides: list[str], run_dir: Path, log: Path) -> dict:
    """One `k15 train` in a subprocess (skipped when its summary exists); returns its records."""
    metrics = run_dir / "metrics.jsonl"
    if not _finished(metrics):
        if run_dir.exists():
            for f in run_dir.glob("metrics.jsonl"):
                f.unlink()  # a run cut short starts over
        start = time.perf_counter()
        run_k15(["train", *overrides, f"run_dir={run_dir}"], log)
        print(f"  {run_dir.name}: {time.perf_counter() - start:.0f}s", flush=True)
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def k15_eval(checkpoint: Path, out: Path, greedy: bool = False) -> dict:
    """`k15 eval` of a policy on the held-out set at up to 128 tokens, greedy or 8 samples at
    temperature 1 (skipped when its results exist): pass@1 and mean response length."""
    if not (out / "results.json").is_file():
        settings = ["eval.temperature=0"] if greedy else ["eval.samples=8", "eval.temperature=1.0"]
        run_k15(["eval", f"model.path={checkpoint}", "rollout.max_response_tokens=128", f"eval.output={out}",
                 "logger=none", *settings], out.parent / f"{out.name}.log")
    results = json.loads((out / "results.json").read_text())
    return {"accuracy": results["pass_at_k"]["pass@1"], "mean_length": results["lengths"]["mean"]}


def _finished(metrics: Path) -> bool:
    return metrics.is_file() and any(json.loads(l).get("summary") for l in metrics.read_text().splitlines())


def write_task_mix(path: Path, seed: int = 7) -> Path:
    """Built-in problems where a quarter is hard (6 operations) and the rest easy (3 operations);
    a small training set, so problems come back and success rates mean something."""
    from k15.data.arithmetic import generate_problems

    path.mkdir(parents=True, exist_ok=True)
    for name, n, offset in (("train", 240, 0), ("eval", 256, 1000)):
        easy = generate_problems(n * 3 // 4, seed + offset, min_ops=3, max_ops=3, prefix=f"{name}-easy")
        hard = generate_problems(n // 4, seed + offset + 1, min_ops=6, max_ops=6, prefix=f"{name}-hard")
        with (path / f"{name}.jsonl").open("w") as f:
            for p in easy + hard:
                f.write(json.dumps(p.as_record()) + "\n")
    return path


def summarize(records: list[dict]) -> dict:
    iters = [r for r in records if "reward" in r and "iter" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    last = evals[-1] if evals else {}
    return {"train_accuracy": [r["accuracy"] for r in iters], "train_length": [r["mean_length"] for r in iters],
            **{k: v for k, v in last.items() if k.startswith("eval_")},
            "eval_accuracy_before": evals[0]["eval_accuracy"] if len(evals) > 1 else None,
            "rl_seconds": next((r.get("rl_seconds") for r in records if r.get("summary")), None)}


def plot(name: str, results: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for color, (arm, runs) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], results.items()):
        for key, ax in zip(("train_accuracy", "train_length"), axes):
            curves = np.array([r[key] for r in runs])
            for c in curves:
                ax.plot(np.arange(1, len(c) + 1), c, color=color, alpha=0.25, lw=0.8)
            ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(0), color=color, lw=2,
                    label=f"{arm} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    axes[0].set_title(f"{name}: training accuracy (sampled)")
    axes[1].set_title(f"{name}: mean response length (tokens)")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(name: str, metric: str, results: dict) -> str:
    lines = [f"### {name} (metric read by the acceptance: {metric})", "",
             "| arm | seeds | held-out acc before | held-out acc after | hard quarter (d6) | held-out mean length | "
             "sampled pass@1 | sampled mean length | RL seconds |", "|---|---|---|---|---|---|---|---|---|"]

    def ms(runs, key, pct=True):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            return "-"
        scale = 100 if pct else 1
        sd = f" ± {scale * np.std(vals):.1f}" if len(vals) > 1 else ""
        return f"{scale * np.mean(vals):.1f}{sd}"

    for arm, runs in results.items():
        lines.append(f"| {arm} | {len(runs)} | {ms(runs, 'eval_accuracy_before')} | {ms(runs, 'eval_accuracy')} | "
                     f"{ms(runs, 'eval_accuracy_d6')} | {ms(runs, 'eval_mean_length', False)} | "
                     f"{ms(runs, 'sampled_pass@1')} | {ms(runs, 'sampled_mean_length', False)} | "
                     f"{ms(runs, 'rl_seconds', False)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/ablate"))
    ap.add_argument("--only", nargs="*", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--length-seeds", type=int, nargs="*", default=[0], help="seeds of the length experiment")
    ap.add_argument("--arms", nargs="*", default=None, help="only these arms (default: all)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    print("warm-up checkpoint (shared by every arm)", flush=True)
    k15_train(WARMUP + ["algo.num_iters=0", "eval_after=false", "logger=none"], out / "warmup", out / "warmup.log")
    checkpoint = out / "warmup" / "checkpoint"
    mix = write_task_mix(out / "task-mix")

    summary_path = out / "ablations.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for name in args.only:
        iters, arms, extra, metric = EXPERIMENTS[name]
        seeds = args.length_seeds if name == "length" else args.seeds
        results = {}
        for arm, overrides in arms.items():
            if args.arms and arm not in args.arms:
                continue
            print(f"{name} / {arm}: seeds {seeds}, {iters} iterations", flush=True)
            results[arm] = []
            for seed in seeds:
                run_dir = out / name / f"{arm}-s{seed}"
                run_dir.parent.mkdir(parents=True, exist_ok=True)
                o = (RL_BASE + [f"model.path={checkpoint}", f"algo.num_iters={iters}", f"seed={seed}"]
                     + [e.format(mix=mix) for e in extra] + overrides)
                result = summarize(k15_train(o, run_dir, run_dir.parent / f"{arm}-s{seed}.log"))
                if name == "length":  # greedy decoding hides how often the policy still self-checks
                    sampled = k15_eval(run_dir / "checkpoint", run_dir / "eval-sampled")
                    result.update({"sampled_pass@1": sampled["accuracy"], "sampled_mean_length": sampled["mean_length"]})
                results[arm].append(result)
        summary[name] = {"metric": metric, "iterations": iters, "results": results}
        summary_path.write_text(json.dumps(summary, indent=1))
        print(f"plot: {plot(name, results, out)}")
        print(table(name, metric, results) + "\n", flush=True)


if __name__ == "__main__":
    main()
