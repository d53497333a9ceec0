"""GPU end-to-end run (issue 4): `k15 train` on one GPU, the trainer and a PyTorch-engine rollout
actor colocated on it (cluster=colocated), a Qwen2-0.5B-shaped model (model=qwen2_0p5b, random
init), the fused Triton log-probs in the trainer. Prints, per iteration, rollout and training
tokens per second and the seconds of the weight sync, and writes them to <out>/gpu_end_to_end.json.

    python benchmarks/gpu_end_to_end.py --out /tmp/e2e            # 3 iterations
    python benchmarks/gpu_end_to_end.py --iters 5 rollout.num_workers=1 algo.prompts_per_iter=64
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--out", default="runs/gpu-e2e")
    ap.add_argument("overrides", nargs="*", help="more k15 train overrides")
    args = ap.parse_args()
    run_dir = Path(args.out).resolve() / "run"
    cmd = [sys.executable, "-m", "k15.cli", "train", "cluster=colocated", "model=qwen2_0p5b",
           f"algo.num_iters={args.iters}", f"trainer.warmup_steps={args.warmup_steps}", "logger=none",
           "eval_before=false", "eval_after=false", f"run_dir={run_dir}", *args.overrides]
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - start

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    iters = [r for r in rows if "iter" in r and "train_seconds" in r]
    summary = next((r for r in rows if r.get("summary")), {})
    keys = ["iter", "rollout_tokens", "rollout_tokens_per_s", "trained_tokens", "train_seconds", "train_tokens_per_s",
            "sync_seconds", "iter_seconds"]
    print(f"\n{'iter':>4} {'rollout tok':>11} {'rollout tok/s':>13} {'train tok':>9} {'train s':>8} "
          f"{'train tok/s':>11} {'sync s':>7} {'iter s':>7}")
    for r in iters:
        print(f"{r['iter']:>4} {r.get('rollout_tokens', 0):>11} {r.get('rollout_tokens_per_s', 0):>13.0f} "
              f"{r['trained_tokens']:>9} {r['train_seconds']:>8.2f} {r['train_tokens_per_s']:>11.0f} "
              f"{r['sync_seconds']:>7.3f} {r['iter_seconds']:>7.2f}")
    out = {"command": " ".join(cmd), "wall_seconds": wall, "iterations": [{k: r.get(k) for k in keys} for r in iters],
           "summary": summary}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "gpu_end_to_end.json").write_text(json.dumps(out, indent=1))
    if len(iters) != args.iters:
        sys.exit(f"expected {args.iters} iterations in metrics.jsonl, found {len(iters)}")


if __name__ == "__main__":
    main()
