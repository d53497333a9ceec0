"""Held-out accuracy: greedy generation on the rollout actors, scored by the reward pool."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from k15.rollout.engine import SamplingParams
from k15.schema import SEGMENT_SCHEMA, make_sample_id


def fresh_rows(records: list[dict], prompt_tokens: list[list[int]], samples: int, id_suffix: str = "") -> list[dict]:
    """Segment rows with empty responses: `samples` per record, ready for a rollout actor."""
    rows = []
    for rec, tokens in zip(records, prompt_tokens):
        prompt_id = rec["prompt_id"] + id_suffix
        for j in range(samples):
            rows.append({"sample_id": make_sample_id(prompt_id, j), "prompt_id": prompt_id, "sample_idx": j,
                         "task": rec["task"], "answer": rec["answer"], "difficulty": rec.get("difficulty"),
                         "prompt_tokens": tokens, "response_tokens": [], "logprobs": [], "versions": [],
                         "finished": False, "finish_reason": "budget", "reward": None, "length": 0,
                         "num_segments": 0})
    return rows


def evaluate(rollout_actors, reward_pool, records: list[dict], prompt_tokens: list[list[int]],
             max_response_tokens: int) -> dict:
    """Greedy pass@1 on held-out problems; the split runs on every rollout actor at once."""
    table = pa.Table.from_pylist(fresh_rows(records, prompt_tokens, 1), schema=SEGMENT_SCHEMA)
    params = SamplingParams(temperature=0.0, max_response_tokens=max_response_tokens)
    parts = np.array_split(np.arange(table.num_rows), len(rollout_actors))
    refs = [reward_pool.score(a.rollout.remote(table.take(idx), params)) for a, idx in zip(rollout_actors, parts)]
    scored = pa.concat_tables(ray.get(refs))
    rewards = np.array(scored["reward"].to_pylist(), dtype=float)
    lengths = np.array(scored["length"].to_pylist(), dtype=float)
    out = {"eval_accuracy": float((rewards >= 1.0).mean()), "eval_mean_length": float(lengths.mean()),
           "eval_problems": int(scored.num_rows)}
    difficulty = np.array([np.nan if d is None else d for d in scored["difficulty"].to_pylist()], dtype=float)
    levels = np.unique(difficulty[~np.isnan(difficulty)])
    if 1 < len(levels) <= 12:  # a per-level breakdown when the labels are a few discrete levels
        for d in levels:
            out[f"eval_accuracy_d{d:g}"] = float((rewards[difficulty == d] >= 1.0).mean())
    return out
