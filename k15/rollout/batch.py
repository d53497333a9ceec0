"""Sample a fixed prompt set on the rollout actors and score it with the reward pool (k15 eval, curate).

Rows go out in chunks spread over the actors; each chunk is scored as soon as it is generated (so
scoring overlaps generation) and moves the progress bar.
"""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import ray
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from k15.evaluate import fresh_rows
from k15.metrics import console
from k15.rollout.engine import SamplingParams
from k15.schema import SEGMENT_SCHEMA

CHUNK_ROWS = 512  # rows per rollout call: big batches keep a CPU core busy, small ones move the bar
KEEP = ["prompt_id", "reward", "length", "finish_reason"]


class BatchSampler:
    """rollout.num_workers RolloutActors holding the policy of `model`, and a RewardPool."""

    def __init__(self, cfg):
        from k15.cluster import init_ray
        from k15.models import load_policy_tokenizer
        from k15.reward.pool import RewardPool
        from k15.rollout.actor import RolloutActor

        self.cfg = cfg
        self.tokenizer = load_policy_tokenizer(cfg.model)
        n = cfg.rollout.num_workers
        init_ray(cfg.cluster, cpus_needed=n)
        # No repeat penalty: here a reward says only whether the answer is right.
        self.reward_pool = RewardPool(cfg.cluster.reward_workers, cfg.model.tokenizer or cfg.model.path, 0.0,
                                      config=cfg.reward)
        self.actors = [RolloutActor.options(num_cpus=1).remote(cfg.model, cfg.rollout, cfg.seed) for _ in range(n)]
        self.calls = 0

    def params(self, temperature: float, max_response_tokens: int) -> SamplingParams:
        """The training rollouts' settings (top-p, repeat detection), with no token budget: every
        sample runs to its end in one call."""
        r = self.cfg.rollout
        return SamplingParams(temperature=temperature, top_p=r.top_p, max_response_tokens=max_response_tokens,
                              token_budget=None, repeat_ngram=r.repeat_ngram, repeat_times=r.repeat_times)

    def encode(self, text: str, special: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def sample(self, records: list[dict], samples: int, params: SamplingParams, prefix: list[int] = (),
               desc: str = "sampling", with_tokens: bool = False) -> list[list[dict]]:
        """Per record, its `samples` scored rows ({reward, length, finish_reason}, and
        prompt_tokens and response_tokens `with_tokens`). A `prefix` starts every response: the
        engine continues after it, and it is scored with it."""
        keep = KEEP + ["prompt_tokens", "response_tokens"] * with_tokens
        per_chunk = max(1, CHUNK_ROWS // samples)
        pending = {}
        for start in range(0, len(records), per_chunk):
            chunk = records[start:start + per_chunk]
            ids = [{**r, "prompt_id": str(start + i)} for i, r in enumerate(chunk)]  # row -> record index
            rows = fresh_rows(ids, [self.encode(r["prompt"]) for r in chunk], samples)
            for row in rows:
                row.update(response_tokens=list(prefix), logprobs=[0.0] * len(prefix),
                           versions=[0] * len(prefix), length=len(prefix))
            table = pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)
            seeded = dataclasses.replace(params, seed=self.cfg.seed * 1_000_003 + self.calls)
            actor = self.actors[self.calls % len(self.actors)]
            self.calls += 1
            pending[self.reward_pool.score(actor.rollout.remote(table, seeded))] = len(chunk)
        out: list[list[dict]] = [[] for _ in records]
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("problems"),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(desc, total=len(records))
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                done = pending.pop(ready[0])
                for row in ray.get(ready[0]).select(keep).to_pylist():
                    out[int(row.pop("prompt_id"))].append(row)
                bar.advance(task, done)
        return out

    def close(self) -> None:
        """Stop the rollout actors and reward workers (their CPUs go back to the next phase)."""
        for actor in self.actors:
            ray.kill(actor)
        self.reward_pool.close()
