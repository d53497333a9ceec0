"""Wall time of the same RL run with rollouts overlapping training versus strictly alternating.

    python benchmarks/bench_overlap.py [--iters 20] [key=value ...]

Both runs train on the same number of samples (iters x prompts_per_iter x k) from the same warm-up
state; the script prints one table and writes benchmarks/overlap.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from k15.cli import compose_config


def run(overrides: list[str]) -> dict:
    import ray

    from k15.controller import Controller

    cfg = compose_config(overrides)
    run_dir = Path("runs") / f"bench-overlap-{int(time.time())}"
    controller = Controller(cfg, run_dir)
    controller.warmup()
    controller.publish_weights()
    start = time.perf_counter()
    for it in range(1, cfg.algo.num_iters + 1):
        batch = controller.collect_groups(it)
        train = controller.wait_keeping_rollouts_busy(controller.trainer.train_iteration.remote(batch), it)
        controller.publish_weights(version=train["version"])
    controller.drain()
    seconds = time.perf_counter() - start
    stats = ray.get(controller.buffer.stats.remote())
    controller.logger.finish()
    ray.shutdown()
    return {"seconds": seconds, "groups_taken": stats["groups_taken"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=20)
    args, extra = parser.parse_known_args()
    base = ["logger=none", f"algo.num_iters={args.iters}", "eval_before=false", "eval_after=false",
            "trainer.warmup_steps=100", *extra]
    results = {}
    for name, overlap in (("overlapped", "true"), ("alternating", "false")):
        results[name] = run(base + [f"rollout.overlap={overlap}"])
        print(f"{name}: {results[name]['seconds']:.1f}s", flush=True)
    speedup = results["alternating"]["seconds"] / results["overlapped"]["seconds"]
    print(f"\n| mode | RL wall time (s) | groups trained |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['groups_taken']} |")
    print(f"\nspeedup from overlap: {speedup:.2f}x")
    Path("benchmarks/overlap.json").write_text(json.dumps({**results, "speedup": speedup, "args": sys.argv[1:]}, indent=2))


if __name__ == "__main__":
    main()
