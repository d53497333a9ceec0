"""The rollout actor: continues segments with its engine and writes them back as Arrow segments.

Two concurrency groups: one generates, the other receives weight broadcasts at the same time; the
engine swaps the new weights in between two decoding steps.
"""

from __future__ import annotations

import pyarrow as pa
import ray
import torch

from k15.rollout.engine import GenerationRequest, SamplingParams
from k15.schema import SEGMENT_SCHEMA, validate


def continue_segments(engine, table: pa.Table, params: SamplingParams) -> pa.Table:
    """Generate for every row of `table` (fresh samples have empty responses) and return the rows
    with the new tokens appended; rows that hit the token budget stay unfinished."""
    table = validate(table)
    rows = table.to_pylist()
    requests = [GenerationRequest(r["prompt_tokens"], r["response_tokens"]) for r in rows]
    for row, res in zip(rows, engine.generate(requests, params)):
        row["response_tokens"] = row["response_tokens"] + res.tokens
        row["logprobs"] = row["logprobs"] + res.logprobs
        row["versions"] = row["versions"] + res.versions
        row["finished"], row["finish_reason"] = res.finished, res.finish_reason
        row["length"] = len(row["response_tokens"])
        row["num_segments"] += 1
    return pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)


@ray.remote(concurrency_groups={"generate": 1, "sync": 1})
class RolloutActor:
    def __init__(self, model_cfg, seed: int, num_threads: int = 1, device: str = "cpu"):
        from k15.models import load_policy, load_policy_tokenizer
        from k15.rollout.torch_engine import TorchEngine

        torch.set_num_threads(num_threads)
        tokenizer = load_policy_tokenizer(model_cfg)
        model = load_policy(model_cfg, tokenizer, seed)
        self.engine = TorchEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, device=device)
        self.receiver = None

    def pid(self) -> int:
        import os

        return os.getpid()

    @ray.method(concurrency_group="sync")
    def init_sync(self, info, rank: int, bucket_bytes: int) -> None:
        from k15.sync.broadcast import WeightReceiver

        self.receiver = WeightReceiver(info, rank, bucket_bytes)

    @ray.method(concurrency_group="sync")
    def receive_weights(self, meta, version: int) -> int:
        tensors = dict(self.receiver.receive(meta))
        self.engine.update_weights(tensors, version)
        return version

    @ray.method(concurrency_group="generate")
    def rollout(self, table: pa.Table, params: SamplingParams) -> pa.Table:
        return continue_segments(self.engine, table, params)

    def version(self) -> int:
        return self.engine.version
