"""Reward actors: score finished segments of an Arrow table, spread over a pool of Ray actors.

Each actor holds a Scorer (k15.reward.verifiers): a math-verify worker with a per-answer timeout
and, once a code row arrives, a sandbox with `code_concurrency` runs in flight. Actor calls queue
one at a time per actor (Ray's default), so the pool's concurrency is num_actors x
code_concurrency sandbox runs; every sample is bounded by its own limits, and the pool keeps a
deadline per call on top (rows of a call that misses it score 0 with reason "reward_timeout" and
the actor is restarted; Ray retries a call once when its actor dies and comes back). Why each row got its reward is kept in the table's schema metadata:
`reasons_of(table)`, `reason_counts(table)`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import ray

from k15.reward.verifiers import VERIFIERS, RewardConfig, Scorer  # noqa: F401  (VERIFIERS: registry)
from k15.schema import validate

REASONS_KEY = b"k15.reward.reasons"
log = logging.getLogger(__name__)

_default_scorer: Scorer | None = None
_default_lock = threading.Lock()


def default_scorer() -> Scorer:
    """The process-wide Scorer that score_table uses when given none."""
    global _default_scorer
    with _default_lock:
        if _default_scorer is None:
            _default_scorer = Scorer()
        return _default_scorer


def _with_reasons(table: pa.Table, reasons: list[str | None]) -> pa.Table:
    """Keep why each row got its reward in the schema metadata, keyed by sample_id, so it stays
    right when the table is later sliced or concatenated (Arrow keeps the first table's metadata)."""
    by_id = {sid: r for sid, r in zip(table["sample_id"].to_pylist(), reasons) if r is not None}
    meta = dict(table.schema.metadata or {})
    meta[REASONS_KEY] = json.dumps(by_id).encode()
    return table.replace_schema_metadata(meta)


def reasons_of(table: pa.Table) -> list[str | None]:
    """Per row: why it got its reward (None for rows not scored, or scored elsewhere)."""
    raw = (table.schema.metadata or {}).get(REASONS_KEY)
    by_id = json.loads(raw) if raw else {}
    return [by_id.get(sid) for sid in table["sample_id"].to_pylist()]


def reason_counts(table: pa.Table) -> dict[str, int]:
    return dict(Counter(r for r in reasons_of(table) if r is not None))


def score_table(table: pa.Table, tokenizer_decode, repeat_penalty: float = 0.0, scorer: Scorer | None = None) -> pa.Table:
    """Fill `reward` for finished rows (unfinished segments keep null). A sample stopped by repeat
    detection scores -repeat_penalty without being verified."""
    table = validate(table)
    rewards = table["reward"].to_pylist()
    reasons: list[str | None] = [None] * table.num_rows
    items, where = [], []
    rows = table.select(["task", "answer", "response_tokens", "finished", "finish_reason"]).to_pylist()
    for i, row in enumerate(rows):
        if not row["finished"]:
            continue
        if row["finish_reason"] == "repeat" and repeat_penalty:
            rewards[i], reasons[i] = -float(repeat_penalty), "repeat"
            continue
        if row["task"] not in VERIFIERS:
            raise ValueError(f"no verifier for task '{row['task']}' (known: {sorted(VERIFIERS)})")
        try:
            text = tokenizer_decode(row["response_tokens"])
        except Exception as e:  # tokens the tokenizer cannot decode: the sample is unusable
            rewards[i], reasons[i] = 0.0, f"error: decode {type(e).__name__}"
            continue
        items.append((row["task"], text, row["answer"]))
        where.append(i)
    for i, result in zip(where, (scorer or default_scorer()).score_many(items)):
        rewards[i], reasons[i] = float(result.reward), result.reason
    column = pa.array(rewards, type=pa.float32())
    table = table.set_column(table.schema.get_field_index("reward"), "reward", column)
    return _with_reasons(table, reasons)


@ray.remote(num_cpus=0, max_restarts=5, max_task_retries=1)  # scoring is idempotent: safe to retry
class RewardActor:
    def __init__(self, tokenizer_path: str, repeat_penalty: float = 0.0, config: dict | None = None):
        from k15.models.tokenizer import load_tokenizer
        from k15.rollout.actor import was_restarted

        if was_restarted():
            log.warning("reward actor restarted after its process died; Ray retries the call it was running")

        self._tokenizer = load_tokenizer(tokenizer_path)
        self._repeat_penalty = repeat_penalty
        self._scorer = Scorer(config)

    def _decode(self, tokens) -> str:
        return self._tokenizer.decode(tokens, skip_special_tokens=True)

    def score(self, table: pa.Table) -> pa.Table:
        return score_table(table, self._decode, self._repeat_penalty, self._scorer)

    def score_items(self, items: list[tuple[str, str, str]]) -> list[tuple[float, str]]:
        """(task, response text, answer) -> (reward, reason), for callers without token tables."""
        return [(r.reward, r.reason) for r in self._scorer.score_many(items)]


class RewardPool:
    """Splits a table across reward actors and puts it back together, in order.

    config: the `reward:` options (k15.reward.verifiers.RewardConfig fields, dict or OmegaConf).
    timeout_s: deadline for one actor call (a backstop: every sample has its own limits).
    max_restarts: how often Ray restarts an actor whose process dies.
    """

    def __init__(self, num_actors: int, tokenizer_path: str, repeat_penalty: float = 0.0,
                 config: dict | None = None, timeout_s: float = 600.0, max_restarts: int = 5):
        if num_actors < 1:
            raise ValueError(f"reward pool 'num_actors' must be >= 1, got {num_actors}")
        if config is not None and not isinstance(config, dict):
            config = dataclass_or_omegaconf_to_dict(config)
        RewardConfig.from_dict(config)  # fail here, naming the option, not in every actor
        self.actors = [RewardActor.options(max_restarts=max_restarts).remote(tokenizer_path, repeat_penalty, config)
                       for _ in range(num_actors)]
        self.timeout_s = timeout_s

    def score(self, table_ref, timeout_s: float | None = None) -> ray.ObjectRef:
        """Score a table (or a ref to one); returns a ref to the scored table without blocking."""
        return _score_on_pool.remote(self.actors, table_ref, timeout_s or self.timeout_s)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def dataclass_or_omegaconf_to_dict(config) -> dict:
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(config):
            return OmegaConf.to_container(config, resolve=True)
    except ImportError:
        pass
    import dataclasses

    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    raise ValueError(f"reward pool 'config' must be a dict, got {type(config).__name__}")


@ray.remote(num_cpus=0)
def _score_on_pool(actors, table: pa.Table, timeout_s: float) -> pa.Table:
    if table.num_rows == 0:
        return table
    deadline = time.monotonic() + timeout_s
    parts = [idx for idx in np.array_split(np.arange(table.num_rows), len(actors)) if len(idx)]
    pending = {actors[k].score.remote(table.take(idx)): k for k, idx in enumerate(parts)}
    scored: dict[int, pa.Table] = {}
    failed: dict[int, str] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        k = pending.pop(ready[0])
        try:
            scored[k] = ray.get(ready[0])
        except ray.exceptions.RayActorError as e:  # died again after Ray's own retry
            failed[k] = "reward_actor_died"
            log.error("reward actor died while scoring %d rows: %s", len(parts[k]), e)
    for ref, k in pending.items():
        failed[k] = "reward_timeout"
        log.error("reward actor missed the %.0fs deadline on %d rows; restarting it", timeout_s, len(parts[k]))
        ray.cancel(ref)  # not to be retried on the restarted actor
        ray.kill(actors[k], no_restart=False)
    out = []
    for k, idx in enumerate(parts):
        if k in scored:
            out.append((scored[k].replace_schema_metadata(None), reasons_of(scored[k])))
            continue
        part = table.take(idx)
        finished = part["finished"].to_pylist()
        rewards = [0.0 if f else r for f, r in zip(finished, part["reward"].to_pylist())]
        part = part.set_column(part.schema.get_field_index("reward"), "reward", pa.array(rewards, pa.float32()))
        out.append((part.replace_schema_metadata(None), [failed[k] if f else None for f in finished]))
    merged = pa.concat_tables([t for t, _ in out])
    return _with_reasons(merged, [r for _, rs in out for r in rs])
