"""Sequence packing against padded batching on a long-tail length distribution (CPU, seconds).

Draws a few thousand sample lengths from a lognormal clipped to [16, 8192] (p99/median >= 8, as
long chain-of-thought responses are), then counts, for token budgets of 32768 and 8192:

  packed (FFD)       k15.trainer.packing.plan_bins: whole samples in bins of `budget` tokens, each
                     bin padded to exactly the budget (pad_to_budget, what the trainer runs on CUDA);
                     waste from packing.padding_waste
  padded, random     the usual padded DataLoader: batches of B samples in data order, each padded to
                     its longest sample
  padded, sorted     the same with the samples sorted by length first (the fair padded baseline)

B is chosen so that a padded batch holds about as many sample tokens on average as a packed
micro-batch: B = round(mean sample tokens per packed micro-batch / mean sample length).

Columns: micro-batches; waste = share of token slots that hold no sample; tokens through the model
= slots computed (micro-batches x their length); the longest micro-batch in slots (memory).

    python benchmarks/packing.py                   # writes benchmarks/packing.json
    python benchmarks/packing.py --out /tmp/p.json --samples 8000
Exits 1 if packing wastes 5% or more at any budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from k15.trainer.packing import padding_waste, plan_bins  # noqa: E402

MAX_WASTE = 0.05
BUDGETS = (32768, 8192)
MIN_LEN, MAX_LEN = 16, min(BUDGETS)  # one distribution for both budgets: every sample fits both


def draw_lengths(n: int, median: float, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n).round(), MIN_LEN, MAX_LEN).astype(np.int64)


def packed_row(lengths: list[int], budget: int) -> dict:
    bins = plan_bins(lengths, budget)
    slots = len(bins) * budget
    return {"micro_batches": len(bins), "waste": padding_waste(lengths, budget), "model_tokens": slots,
            "max_micro_batch_tokens": budget, "batch_size": None,
            "check_waste": 1 - sum(lengths) / slots}


def padded_row(lengths: np.ndarray, batch_size: int, sort: bool) -> dict:
    order = np.argsort(lengths, kind="stable") if sort else np.arange(len(lengths))
    ls = lengths[order]
    batches = [ls[i:i + batch_size] for i in range(0, len(ls), batch_size)]
    slots = [len(b) * int(b.max()) for b in batches]
    return {"micro_batches": len(batches), "waste": 1 - int(ls.sum()) / sum(slots), "model_tokens": sum(slots),
            "max_micro_batch_tokens": max(slots), "batch_size": batch_size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--median", type=float, default=512.0)
    ap.add_argument("--sigma", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "packing.json"))
    args = ap.parse_args()
    start = time.perf_counter()

    lengths = draw_lengths(args.samples, args.median, args.sigma, args.seed)
    med, p99, mean = float(np.median(lengths)), float(np.percentile(lengths, 99)), float(lengths.mean())
    tail = p99 / med
    print(f"{args.samples} samples, lognormal(median {args.median:g}, sigma {args.sigma:g}) clipped to "
          f"[{MIN_LEN}, {MAX_LEN}], seed {args.seed}: median {med:g}, mean {mean:.0f}, p99 {p99:g}, "
          f"max {lengths.max()}, p99/median {tail:.1f}, {int(lengths.sum())} tokens")
    assert tail >= 8, f"the distribution is not long-tailed enough: p99/median = {tail:.1f} < 8"

    results = {"config": {"samples": args.samples, "median": args.median, "sigma": args.sigma, "seed": args.seed,
                          "min_len": MIN_LEN, "max_len": MAX_LEN},
               "lengths": {"median": med, "mean": mean, "p99": p99, "max": int(lengths.max()),
                           "p99_over_median": tail, "total_tokens": int(lengths.sum())},
               "budgets": {}}
    as_list = lengths.tolist()
    for budget in BUDGETS:
        packed = packed_row(as_list, budget)
        assert abs(packed.pop("check_waste") - packed["waste"]) < 1e-12
        per_micro = int(lengths.sum()) / packed["micro_batches"]
        batch_size = max(1, round(per_micro / mean))
        results["budgets"][str(budget)] = {
            "batch_size_rule": f"B = round({per_micro:.0f} sample tokens per packed micro-batch / "
                               f"{mean:.0f} mean length) = {batch_size}",
            "packed (FFD)": packed,
            "padded, random": padded_row(lengths, batch_size, sort=False),
            "padded, sorted": padded_row(lengths, batch_size, sort=True),
        }
    results["seconds"] = time.perf_counter() - start

    print_table(results)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.1f} s)")

    worst = max(r["packed (FFD)"]["waste"] for r in results["budgets"].values())
    if worst >= MAX_WASTE:
        print(f"FAIL: packing wastes {worst:.2%} >= {MAX_WASTE:.0%}")
        return 1
    return 0


def print_table(results: dict) -> None:
    total = results["lengths"]["total_tokens"]
    header = ["budget", "method", "B", "micro-batches", "waste", "tokens through model", "vs. packed",
              "largest micro-batch"]
    rows = []
    for budget, by in results["budgets"].items():
        base = by["packed (FFD)"]["model_tokens"]
        for name in ("packed (FFD)", "padded, random", "padded, sorted"):
            r = by[name]
            rows.append([budget, name, "-" if r["batch_size"] is None else str(r["batch_size"]),
                         str(r["micro_batches"]), f"{r['waste']:.2%}", f"{r['model_tokens']:,}",
                         f"{r['model_tokens'] / base:.2f}x", f"{r['max_micro_batch_tokens']:,}"])
    notes = [f"sample tokens: {total:,}; waste = share of token slots holding no sample"] + \
            [f"budget {b}: {by['batch_size_rule']}" for b, by in results["budgets"].items()]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        print("\n".join(notes))
        return
    table = Table(title="Sequence packing vs. padded batches", caption="\n".join(notes))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for k, r in enumerate(rows):
        table.add_row(*r, end_section=k % 3 == 2)
    Console(width=140).print(table)


if __name__ == "__main__":
    sys.exit(main())
