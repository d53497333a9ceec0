"""The rollout actor: continues segments with its engine and writes them back as Arrow segments.

Two concurrency groups: one generates, the other receives weight broadcasts at the same time; the
engine swaps the new weights in between two decoding steps.

Ray restarts a rollout actor whose process dies (max_restarts). The restarted actor holds the
initial weights and no place in the broadcast group, so it refuses to generate (NeedsWeights)
until the controller has rebuilt the group and published the current policy to it.
"""

from __future__ import annotations

import logging
import warnings

import pyarrow as pa
import ray
import torch

from k15.rollout.engine import GenerationRequest, SamplingParams
from k15.schema import SEGMENT_SCHEMA, validate

log = logging.getLogger(__name__)


class NeedsWeights(RuntimeError):
    """This actor was restarted and has not received the current policy yet."""


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
    def __init__(self, model_cfg, seed: int, num_threads: int = 1, device: str = "cpu", follows_trainer: bool = False):
        """follows_trainer: the weights come from a trainer's broadcasts (not only from model_cfg)."""
        from k15.models import load_policy, load_policy_tokenizer
        from k15.rollout.torch_engine import TorchEngine

        torch.set_num_threads(num_threads)
        tokenizer = load_policy_tokenizer(model_cfg)
        model = load_policy(model_cfg, tokenizer, seed)
        self.engine = TorchEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, device=device)
        self.receiver = None
        self.sync_group = None  # which broadcast group this actor joined (None: none yet)
        self.has_weights = True
        if was_restarted() and follows_trainer:
            self.has_weights = False
            log.warning("rollout actor restarted after its process died; waiting for the current weights")

    def pid(self) -> int:
        import os

        return os.getpid()

    @ray.method(concurrency_group="sync")
    def init_sync(self, info, rank: int, bucket_bytes: int) -> None:
        from k15.sync.broadcast import WeightReceiver

        self.receiver = WeightReceiver(info, rank, bucket_bytes)
        self.sync_group = info.master_port

    @ray.method(concurrency_group="sync")
    def sync_state(self) -> tuple[int | None, bool]:
        """(broadcast group joined, whether it holds published weights): the controller's health check."""
        return self.sync_group, self.has_weights

    @ray.method(concurrency_group="sync")
    def receive_weights(self, meta, version: int) -> int:
        tensors = dict(self.receiver.receive(meta))
        self.engine.update_weights(tensors, version)
        self.has_weights = True
        return version

    @ray.method(concurrency_group="generate")
    def rollout(self, table: pa.Table, params: SamplingParams) -> pa.Table:
        if not self.has_weights:
            raise NeedsWeights("this rollout actor was restarted and has not received the current weights")
        return continue_segments(self.engine, table, params)

    def version(self) -> int:
        return self.engine.version


def was_restarted() -> bool:
    """True in an actor that Ray has restarted after its process died."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed
