"""`k15 eval` numbers: unbiased pass@k, response lengths, per-difficulty breakdown, table and plot.

Everything here works on plain per-problem results, one dict per problem:
    {"prompt_id": str, "difficulty": float | None, "correct": [bool, ...], "lengths": [int, ...]}
so it can be tested without a model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from k15.atomic import atomic_write

PERCENTILES = (50, 90, 99)


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n is correct), c of n correct:
    1 - C(n-c, k) / C(n, k) (Chen et al. 2021), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i),
    which stays exact where the binomials would overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(problems: list[dict], k: int) -> float:
    return float(np.mean([pass_at_k(len(p["correct"]), sum(p["correct"]), k) for p in problems]))


def length_stats(lengths) -> dict:
    x = np.asarray(lengths, dtype=float)
    if x.size == 0:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    return {"mean": float(x.mean()), **{f"p{q}": float(np.percentile(x, q)) for q in PERCENTILES}}


def difficulty_groups(difficulties: list, max_distinct: int = 8, bins: int = 4) -> list[str]:
    """A label per problem: the difficulty value itself when there are few distinct values, else
    its quantile bin ("[lo, hi]"); "unknown" for problems without a label."""
    known = np.array([d for d in difficulties if d is not None], dtype=float)
    values = np.unique(known)
    if len(values) <= max_distinct:
        return ["unknown" if d is None else f"{d:g}" for d in difficulties]
    edges = np.unique(np.quantile(known, np.linspace(0, 1, bins + 1)))
    labels = []
    for d in difficulties:
        if d is None:
            labels.append("unknown")
            continue
        i = min(int(np.searchsorted(edges, d, side="right")) - 1, len(edges) - 2)  # max goes in the last bin
        labels.append(f"[{edges[i]:g}, {edges[i + 1]:g}]")
    return labels


def _group_key(label: str):
    """Sort groups by their (lower) numeric value; "unknown" last."""
    if label == "unknown":
        return (1, 0.0)
    return (0, float(label.strip("[").split(",")[0]))


def summarize(problems: list[dict], ks: list[int]) -> dict:
    """pass@k over all problems and per difficulty group, and response-length statistics."""
    lengths = [x for p in problems for x in p["lengths"]]
    out = {"problems": len(problems), "samples": int(sum(len(p["correct"]) for p in problems)),
           "pass_at_k": {f"pass@{k}": mean_pass_at_k(problems, k) for k in ks},
           "lengths": length_stats(lengths), "by_difficulty": []}
    labels = difficulty_groups([p.get("difficulty") for p in problems])
    for label in sorted(set(labels), key=_group_key):
        group = [p for p, lab in zip(problems, labels) if lab == label]
        out["by_difficulty"].append({"difficulty": label, "problems": len(group),
                                     **{f"pass@{k}": mean_pass_at_k(group, k) for k in ks},
                                     "mean_length": length_stats([x for p in group for x in p["lengths"]])["mean"]})
    return out


def accuracy_by_length(problems: list[dict], bins: int = 10) -> list[dict]:
    """Samples binned by response length (equal-width bins): accuracy and count per bin."""
    lengths = np.array([x for p in problems for x in p["lengths"]], dtype=float)
    correct = np.array([c for p in problems for c in p["correct"]], dtype=float)
    if lengths.size == 0:
        return []
    lo, hi = lengths.min(), lengths.max()
    edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    index = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        sel = index == b
        if sel.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(sel.sum()),
                        "accuracy": float(correct[sel].mean())})
    return out


def finish_reasons(reasons: list[str]) -> dict:
    return dict(Counter(reasons))


# -- output ------------------------------------------------------------------------------------
def print_table(results: dict, console) -> None:
    from rich.table import Table

    ks = list(results["pass_at_k"])
    table = Table(title=f"k15 eval: {results['problems']} problems x {results['samples_per_problem']} samples")
    table.add_column("difficulty")
    table.add_column("problems", justify="right")
    for k in ks:
        table.add_column(k, justify="right")
    table.add_column("mean length", justify="right")
    for g in results["by_difficulty"]:
        table.add_row(g["difficulty"], str(g["problems"]), *[f"{100 * g[k]:.1f}%" for k in ks], _num(g["mean_length"]))
    table.add_section()
    table.add_row("all", str(results["problems"]), *[f"{100 * results['pass_at_k'][k]:.1f}%" for k in ks],
                  _num(results["lengths"]["mean"]), style="bold")
    console.print(table)
    lens = results["lengths"]
    console.print("response length (tokens): " + ", ".join(f"{name} {_num(lens[name])}" for name in lens))


def _num(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def plot_accuracy_vs_length(bins: list[dict], path: Path, title: str = "accuracy against response length") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    mids = [(b["lo"] + b["hi"]) / 2 for b in bins]
    width = (bins[0]["hi"] - bins[0]["lo"]) * 0.9 if bins else 1.0
    bars = ax.bar(mids, [b["accuracy"] for b in bins], width=width, color="C0", alpha=0.8)
    for bar, b in zip(bars, bins):  # the count tells how much each bar can be trusted
        ax.annotate(f"n={b['count']}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("accuracy (share of correct samples)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the path may be a temp file without the suffix
    plt.close(fig)
    return path


# -- the command -------------------------------------------------------------------------------
def run_eval(cfg, records: list[dict], out_dir: Path, source: str) -> dict:
    """Sample every problem on the rollout actors, score, aggregate, write results.json and the plot."""
    import time

    from k15.atomic import atomic_write_text
    from k15.metrics import console
    from k15.rollout.batch import BatchSampler

    e = cfg.eval
    n = 1 if e.temperature <= 0 else e.samples  # greedy samples would all be the same
    ks = sorted({k for k in e.ks if k <= n})
    skipped = sorted({k for k in e.ks if k > n})
    if skipped:
        console.print(f"eval: skipping pass@{skipped} (needs eval.samples >= k; greedy gives one sample)")
    max_tokens = e.max_response_tokens or cfg.rollout.max_response_tokens
    start = time.perf_counter()
    sampler = BatchSampler(cfg)
    scored = sampler.sample(records, n, sampler.params(e.temperature, max_tokens), desc="eval")
    problems = [{"prompt_id": r["prompt_id"], "difficulty": r.get("difficulty"),
                 "correct": [s["reward"] >= 1.0 for s in rows], "lengths": [s["length"] for s in rows]}
                for r, rows in zip(records, scored)]
    results = {"model": cfg.model.path or "default (untrained)", "source": source,
               "samples_per_problem": n, "temperature": e.temperature, "max_response_tokens": max_tokens,
               **summarize(problems, ks), "accuracy_by_length": accuracy_by_length(problems),
               "finish_reasons": finish_reasons([s["finish_reason"] for rows in scored for s in rows]),
               "wall_seconds": time.perf_counter() - start,
               "per_problem": [{"prompt_id": p["prompt_id"], "difficulty": p["difficulty"], "n": len(p["correct"]),
                                "correct": int(sum(p["correct"])), "mean_length": float(np.mean(p["lengths"]))}
                               for p in problems]}
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1))
    plot = out_dir / "accuracy_vs_length.png"
    atomic_write(plot, lambda tmp: plot_accuracy_vs_length(results["accuracy_by_length"], tmp))
    print_table(results, console)
    console.print(f"results: {out_dir / 'results.json'}\nplot: {plot}")
    return results
