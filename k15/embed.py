"""k15's actors as a library, for a larger (agent) system on Ray that drives them itself.

    from k15.embed import Session
    from k15.schema import append_environment

    s = Session.start("logger=none", "algo.samples_per_prompt=4")   # any `k15 train` overrides
    rows = s.new_rows([{"prompt_id": "q1", "prompt": "...", "answer": "42", "task": "math"}])
    rows = s.generate(rows, max_new_tokens=64)                       # the policy's turn
    rows = [append_environment(r, s.encode("tool says: ...")) for r in rows]   # not trained on
    rows = s.generate(rows, max_new_tokens=64)                       # the next turn
    s.add(s.score(s.end_episodes(rows)))                             # verifiers, then the buffer
    s.train_step(groups=1)                                           # trainer, then new weights out

A Session holds the same actors `k15 train` runs (k15.controller.Controller: rollout actors, reward
pool, replay buffer, trainer, weight broadcast), with the warm-up and the paper's loop left to you.
Rows are the segment schema's dicts (k15/schema.py); environment tokens carry version -1.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from k15.evaluate import fresh_rows
from k15.rollout.engine import SamplingParams
from k15.schema import SEGMENT_SCHEMA, validate


class Session:
    def __init__(self, controller):
        self.controller = controller
        self.cfg = controller.cfg
        self.tokenizer = controller.tokenizer
        self.calls = 0

    @classmethod
    def start(cls, *overrides: str, run_dir: str = "runs/embedded") -> "Session":
        """Start the actors (joining a running Ray if there is one) with `k15 train`'s config."""
        from pathlib import Path

        from k15.cli import compose_config
        from k15.controller import Controller

        cfg = compose_config(list(overrides))
        session = cls(Controller(cfg, Path(run_dir)))
        session.controller.publish_weights(0)
        return session

    # -- the policy -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def new_rows(self, problems: list[dict], samples: int | None = None) -> list[dict]:
        """`samples` (default algo.samples_per_prompt) empty episodes per problem ({prompt_id,
        prompt, answer, task})."""
        k = samples or self.controller.k
        problems = [{"task": "math", **p} for p in problems]
        return fresh_rows(problems, [self.tokenizer(p["prompt"])["input_ids"] for p in problems], k)

    def generate(self, rows: list[dict], max_new_tokens: int, temperature: float | None = None) -> list[dict]:
        """One policy turn for every unfinished row, spread over the rollout actors; finished rows
        come back as they are. Returns the rows in order."""
        todo = [i for i, r in enumerate(rows) if not r["finished"]]
        if not todo:
            return rows
        longest = max(len(rows[i]["response_tokens"]) for i in todo)
        self.calls += 1
        params = SamplingParams(temperature=self.cfg.rollout.temperature if temperature is None else temperature,
                                top_p=self.cfg.rollout.top_p, max_response_tokens=longest + max_new_tokens,
                                seed=self.cfg.seed * 1_000_003 + self.calls)
        actors = self.controller.rollouts
        parts = [p for p in np.array_split(np.array(todo), len(actors)) if len(p)]
        tables = ray.get([a.rollout.remote(pa.Table.from_pylist([rows[i] for i in part], schema=SEGMENT_SCHEMA), params)
                          for a, part in zip(actors, parts)])
        out = list(rows)
        for part, table in zip(parts, tables):
            for i, row in zip(part, table.to_pylist()):
                out[i] = row
        return out

    # -- rewards, buffer, training --------------------------------------------------------------
    @staticmethod
    def end_episodes(rows: list[dict]) -> list[dict]:
        """Mark every row finished (the episode is over), so it can be scored and trained on."""
        return [r if r["finished"] else {**r, "finished": True, "finish_reason": "length"} for r in rows]

    def score(self, rows: list[dict]) -> list[dict]:
        """The verifiers' rewards of finished rows (the policy's and the environment's tokens are
        decoded together: the answer is wherever the episode ends)."""
        table = validate(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA))
        return ray.get(self.controller.reward_pool.score(table)).to_pylist()

    def add(self, rows: list[dict]) -> dict:
        """Scored rows into the replay buffer; complete groups of k become trainable."""
        return ray.get(self.controller.buffer.add.remote(pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)))

    def train_step(self, groups: int) -> dict:
        """Take `groups` complete groups from the buffer, one trainer iteration on them (environment
        tokens masked out), and publish the new weights to the rollout actors."""
        batch = ray.get(self.controller.buffer.take_groups.remote(groups, 60.0))
        stats = ray.get(self.controller.trainer.train_iteration.remote(batch))
        self.controller.publish_weights(stats["version"])
        return stats

    def close(self) -> None:
        self.controller.close()
        ray.shutdown()
