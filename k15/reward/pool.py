"""Reward actors: score finished segments of an Arrow table, spread over a pool of Ray actors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from k15.reward.math import score_math
from k15.schema import validate

VERIFIERS = {"math": score_math}


def score_table(table: pa.Table, tokenizer_decode, repeat_penalty: float = 0.0) -> pa.Table:
    """Fill `reward` for finished rows (unfinished segments keep null). A sample stopped by repeat
    detection scores -repeat_penalty without being verified."""
    table = validate(table)
    rewards = table["reward"].to_pylist()
    for i, row in enumerate(table.select(["task", "answer", "response_tokens", "finished", "finish_reason"]).to_pylist()):
        if not row["finished"]:
            continue
        if row["finish_reason"] == "repeat" and repeat_penalty:
            rewards[i] = -float(repeat_penalty)
            continue
        verifier = VERIFIERS.get(row["task"])
        if verifier is None:
            raise ValueError(f"no verifier for task '{row['task']}' (known: {sorted(VERIFIERS)})")
        rewards[i] = verifier(tokenizer_decode(row["response_tokens"]), row["answer"]).reward
    column = pa.array(rewards, type=pa.float32())
    return table.set_column(table.schema.get_field_index("reward"), "reward", column)


@ray.remote(num_cpus=0)
class RewardActor:
    def __init__(self, tokenizer_path: str, repeat_penalty: float = 0.0):
        from k15.models.tokenizer import load_tokenizer

        self._tokenizer = load_tokenizer(tokenizer_path)
        self._repeat_penalty = repeat_penalty

    def _decode(self, tokens) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)

    def score(self, table: pa.Table) -> pa.Table:
        return score_table(table, self._decode, self._repeat_penalty)


class RewardPool:
    """Splits a table across reward actors and puts it back together, in order."""

    def __init__(self, num_actors: int, tokenizer_path: str, repeat_penalty: float = 0.0):
        self.actors = [RewardActor.remote(tokenizer_path, repeat_penalty) for _ in range(num_actors)]

    def score(self, table_ref) -> ray.ObjectRef:
        """Score a table (or a ref to one); returns a ref to the scored table without blocking."""
        return _score_on_pool.remote(self.actors, table_ref)


@ray.remote(num_cpus=0)
def _score_on_pool(actors, table: pa.Table) -> pa.Table:
    if table.num_rows == 0:
        return table
    parts = np.array_split(np.arange(table.num_rows), len(actors))
    refs = [a.score.remote(table.take(idx)) for a, idx in zip(actors, parts) if len(idx)]
    return pa.concat_tables(ray.get(refs))
