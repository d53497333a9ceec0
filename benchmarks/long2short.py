"""long2short on the built-in task (paper 2.4, Fig. 7): every method from one long-CoT policy, a
table of accuracy and mean length, and the accuracy-against-tokens scatter plot.

    python benchmarks/long2short.py --out runs/long2short
    python benchmarks/long2short.py --out runs/long2short --warmup runs/ablate/warmup/checkpoint \\
        --long runs/ablate/length/off-s0/checkpoint          # reuse the ablations' policies

Steps (each a real `k15` process; finished steps are skipped on a rerun):
1. warm-up: supervised long-CoT warm-up (worked solutions, 70% with a self-check), as in ablate.py;
2. long: `k15 train` from it, 80 RL iterations at up to 128 tokens;
3. short baseline: `k15 train` from the same warm-up with a short-CoT SFT (no self-checks) first,
   same RL budget;
4. `k15 long2short method=merge|shortest|dpo|rl` from the long policy (merge averages it with the
   short baseline; shortest also in 4 rounds);
5. `k15 eval` of every policy on the held-out set: greedy, and 8 samples at temperature 1.
Results: <out>/long2short.json, <out>/long2short.png, a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ablate import RL_BASE, WARMUP, k15_eval, k15_train, run_k15

LONG_ITERS = 80
SHORT_SFT = ["trainer.warmup_steps=300", "data.check_fraction=0.0"]  # short CoT: worked solutions without checks
# The long policy almost always self-checks at temperature 1 (8 samples of a problem then have one
# length), so the sampling methods draw at 1.5, where some samples skip the check.
SAMPLING = ["long2short.problems=1024", "long2short.temperature=1.5", "long2short.steps=200"]
# label: (method, overrides); merge also gets long2short.short_model (the short baseline) below
METHODS = {
    "merge 0.75/0.25": ("merge", ["long2short.merge_weights=[0.75,0.25]"]),
    "merge 0.5/0.5": ("merge", ["long2short.merge_weights=[0.5,0.5]"]),
    "merge 0.25/0.75": ("merge", ["long2short.merge_weights=[0.25,0.75]"]),
    "shortest": ("shortest", SAMPLING + ["long2short.lr=1e-4"]),
    # One round barely moves this policy: few of its 8 samples skip the check. In rounds, each round
    # samples the policy the last one fine-tuned, which skips it a little more often; at temperature 1
    # the samples stay clean (at 1.5, three rounds learned the noise: 42% sampled accuracy).
    "shortest 4 rounds": ("shortest", ["long2short.problems=1024", "long2short.steps=200", "long2short.lr=1e-4",
                                       "long2short.rounds=4"]),
    "dpo": ("dpo", SAMPLING + ["long2short.lr=5e-5", "long2short.beta=0.1"]),
    # the cap must stay above a worked solution without the check (up to ~70 tokens at 6 operations)
    "rl": ("rl", ["algo.num_iters=60", "rollout.max_response_tokens=80", "algo.length_penalty.weight=0.5"]),
}


def long2short(method: str, long_ckpt: Path, out: Path, extra: list[str]) -> Path:
    """`k15 long2short` into `out` (skipped when its checkpoint exists)."""
    if not (out / "checkpoint" / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        run_k15(["long2short", f"method={method}", f"model.path={long_ckpt}", f"long2short.output={out}",
             "rollout.max_response_tokens=128", "logger=none", "long2short.eval_after=false", *extra],
            out.parent / f"{out.name}.log")
    return out / "checkpoint"


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    for ax, mode in zip(axes, ("sampled", "greedy")):
        for i, (name, r) in enumerate(results.items()):
            x, y = r[mode]["mean_length"], 100 * r[mode]["accuracy"]
            marker = "*" if name == "long" else ("s" if name == "short baseline" else "o")
            ax.scatter(x, y, s=140 if marker == "*" else 60, marker=marker, color=f"C{i}", label=name, zorder=3)
        ax.set_xlabel("mean response tokens (held-out)")
        ax.set_title(f"{mode}: " + ("pass@1 over 8 samples at T=1" if mode == "sampled" else "greedy accuracy"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (%)")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center right")
    fig.suptitle("long2short on the built-in task: accuracy against response length (paper Fig. 7)")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/long2short"))
    ap.add_argument("--warmup", type=Path, help="warm-up checkpoint to start from (default: train one)")
    ap.add_argument("--long", type=Path, help="long-CoT checkpoint (default: train one from the warm-up)")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    warmup = args.warmup
    if warmup is None:
        print("warm-up (long CoT, shared)", flush=True)
        k15_train(WARMUP + ["algo.num_iters=0", "eval_after=false", "logger=none"], out / "warmup", out / "warmup.log")
        warmup = out / "warmup" / "checkpoint"
    long_ckpt = args.long
    if long_ckpt is None:
        print(f"long: {LONG_ITERS} RL iterations", flush=True)
        k15_train(RL_BASE + [f"model.path={warmup}", f"algo.num_iters={LONG_ITERS}"], out / "long", out / "long.log")
        long_ckpt = out / "long" / "checkpoint"
    print(f"short baseline: short-CoT SFT, then {LONG_ITERS} RL iterations", flush=True)
    k15_train(RL_BASE + SHORT_SFT + [f"model.path={warmup}", f"algo.num_iters={LONG_ITERS}"], out / "short",
              out / "short.log")
    short_ckpt = out / "short" / "checkpoint"

    checkpoints = {"long": long_ckpt, "short baseline": short_ckpt}
    for label, (method, extra) in METHODS.items():
        print(f"long2short: {label}", flush=True)
        if method == "merge":
            extra = extra + [f"long2short.short_model={short_ckpt}"]
        slug = label.replace(" ", "_").replace("/", "-")
        checkpoints[label] = long2short(method, long_ckpt, out / slug, extra)

    results = {}
    for name, ckpt in checkpoints.items():
        slug = name.replace(" ", "_").replace("/", "-")
        results[name] = {"checkpoint": str(ckpt), "greedy": k15_eval(ckpt, out / "eval" / f"{slug}-greedy", True),
                         "sampled": k15_eval(ckpt, out / "eval" / f"{slug}-sampled")}
    (out / "long2short.json").write_text(json.dumps(results, indent=1))
    print(f"plot: {plot(results, out / 'long2short.png')}")

    base = results["long"]
    lines = ["| policy | greedy acc | greedy mean length | sampled pass@1 | sampled mean length |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        cells = []
        for mode in ("greedy", "sampled"):
            acc, length = r[mode]["accuracy"], r[mode]["mean_length"]
            d_acc, d_len = 100 * (acc - base[mode]["accuracy"]), 100 * (length / base[mode]["mean_length"] - 1)
            delta = name != "long"
            cells += [f"{100 * acc:.1f}%" + (f" ({d_acc:+.1f})" if delta else ""),
                      f"{length:.1f}" + (f" ({d_len:+.0f}%)" if delta else "")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
