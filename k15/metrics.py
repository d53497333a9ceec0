"""Run metrics: one console line per iteration, metrics.jsonl, wandb, a PNG plot and a summary table."""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from k15.atomic import atomic_write_text
from rich.table import Table

console = Console(highlight=False)


class RunLogger:
    """resume_after: continue a run resumed from the checkpoint of that iteration: the records up to
    it are kept, later ones (written by the run that died) dropped, and the same wandb run goes on."""

    def __init__(self, run_dir: Path, config: dict, backend: str = "wandb", project: str = "k15",
                 mode: str | None = None, resume_after: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.history: list[dict] = []
        if resume_after is not None:
            self.history = rewind_jsonl(self.path, resume_after)
        self.wandb = None
        if backend == "wandb":
            import wandb

            if mode is None:  # online only for a user who is logged in
                mode = "online" if (os.environ.get("WANDB_API_KEY") or _wandb_logged_in()) else "offline"
            os.environ.setdefault("WANDB_SILENT", "true")
            id_file = self.run_dir / "wandb_run_id"
            run_id = id_file.read_text().strip() if resume_after is not None and id_file.exists() else None
            self.wandb = wandb.init(project=project, dir=str(self.run_dir), config=config, mode=mode,
                                    id=run_id, resume="allow" if run_id else None,
                                    settings=wandb.Settings(console="off"))
            atomic_write_text(id_file, self.wandb.id)
        elif backend != "none":
            raise ValueError(f"logger.backend must be 'wandb' or 'none', got {backend!r}")

    def log(self, metrics: dict, step: int | None = None) -> None:
        record = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self.history.append(record)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def iteration_line(self, m: dict) -> str:
        return (f"iter {m['iter']:3d} | reward {m['reward']:.3f} acc {m['accuracy']:.3f} | "
                f"len {m['mean_length']:.1f} p95 {m['p95_length']:.0f} | stale {m['staleness']:.2f} | "
                f"{m['tokens_per_s']:.0f} tok/s | wait {m['wait_seconds']:.1f}s train {m['train_seconds']:.1f}s "
                f"sync {m['sync_seconds']:.2f}s")

    def plot(self, name: str = "training.png") -> Path | None:
        rows = [r for r in self.history if "iter" in r and "reward" in r]
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        its = [r["iter"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        axes[0].plot(its, [r["reward"] for r in rows])
        axes[0].set_title("mean reward")
        axes[1].plot(its, [r["accuracy"] for r in rows], label="train samples")
        evals = [r for r in self.history if "eval_accuracy" in r]
        if evals:
            axes[1].scatter([r["iter"] for r in evals], [r["eval_accuracy"] for r in evals], color="C3",
                            label="held-out (greedy)", zorder=3)
        axes[1].set_title("accuracy")
        axes[1].legend()
        axes[2].plot(its, [r["mean_length"] for r in rows], label="mean")
        axes[2].plot(its, [r["p95_length"] for r in rows], label="p95")
        axes[2].set_title("response length (tokens)")
        axes[2].legend()
        for ax in axes:
            ax.set_xlabel("iteration")
        fig.tight_layout()
        path = self.run_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def summary_table(self, rows: list[tuple[str, str]], title: str = "k15 run summary") -> None:
        table = Table(title=title)
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file this run appends to; a last line cut short (the process was killed
    while writing it) is left out."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}, line {i + 1}: not valid JSON") from None
    return records


def rewind_jsonl(path: Path, iteration: int) -> list[dict]:
    """Rewrite a run's JSONL log as it was after `iteration` (a resumed run goes on from there):
    records of later iterations, and the summary, were written by the run that died. Returns the
    records kept."""
    if not Path(path).exists():
        return []
    kept = [r for r in read_jsonl(path) if r.get("iter", 0) <= iteration and not r.get("summary")]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _wandb_logged_in() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
