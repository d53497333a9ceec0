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


def make_engine(model_cfg, rollout_cfg, seed: int):
    """The rollout engine named by `rollout.engine`: torch (the embedded default, CPU or CUDA) or vllm."""
    from k15.models import load_policy, load_policy_tokenizer

    if rollout_cfg.engine == "vllm":
        from k15.rollout.vllm_engine import VllmEngine

        v = rollout_cfg.vllm
        return VllmEngine(model_directory(model_cfg, seed), seed=seed, dtype=v.dtype,
                          gpu_memory_utilization=v.gpu_memory_utilization, max_model_len=v.max_model_len,
                          enable_sleep_mode=v.enable_sleep_mode, enforce_eager=v.enforce_eager,
                          tensor_parallel_size=v.tensor_parallel_size)
    if rollout_cfg.engine != "torch":
        raise ValueError(f"rollout.engine must be torch or vllm, got {rollout_cfg.engine!r}")
    from k15.rollout.torch_engine import TorchEngine

    tokenizer = load_policy_tokenizer(model_cfg)
    model = load_policy(model_cfg, tokenizer, seed)
    if rollout_cfg.get("dtype"):
        model = model.to(getattr(torch, rollout_cfg.dtype))
    return TorchEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, device=rollout_cfg.device)


def model_directory(model_cfg, seed: int) -> str:
    """A Hugging Face directory for engines that load from disk: model.path, or the default model
    (built exactly as the trainer builds it) saved once to a temporary directory."""
    if model_cfg.get("path"):
        return model_cfg.path
    import tempfile

    from k15.models import load_policy, load_policy_tokenizer

    directory = tempfile.mkdtemp(prefix="k15-default-model-")
    tokenizer = load_policy_tokenizer(model_cfg)
    load_policy(model_cfg, tokenizer, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@ray.remote(concurrency_groups={"generate": 1, "sync": 1})
class RolloutActor:
    def __init__(self, model_cfg, rollout_cfg, seed: int, follows_trainer: bool = False):
        """follows_trainer: the weights come from a trainer's broadcasts (not only from model_cfg)."""
        torch.set_num_threads(rollout_cfg.num_threads)
        self.engine = make_engine(model_cfg, rollout_cfg, seed)
        self.sync_group = None  # which broadcast group this actor joined (None: none yet)
        self.has_weights = True
        self.generated = {"tokens": 0, "seconds": 0.0}  # throughput, read by the controller
        if was_restarted() and follows_trainer:
            self.has_weights = False
            log.warning("rollout actor restarted after its process died; waiting for the current weights")

    def pid(self) -> int:
        import os

        return os.getpid()

    def gpu(self) -> str | None:
        """This actor's GPU (node and device UUID), to tell colocated actors from separate ones."""
        from k15.sync import gpu_identity

        return gpu_identity(getattr(self.engine, "weight_device", None))

    @ray.method(concurrency_group="sync")
    def init_sync(self, info, rank: int, bucket_bytes: int) -> None:
        self.engine.join_weight_group(info, rank, bucket_bytes)
        self.sync_group = info.group_id

    @ray.method(concurrency_group="sync")
    def sync_state(self) -> tuple[int | None, bool]:
        """(broadcast group joined, whether it holds published weights): the controller's health check."""
        return self.sync_group, self.has_weights

    @ray.method(concurrency_group="sync")
    def receive_weights(self, meta, version: int) -> int:
        received = self.engine.receive_weights(meta, version)
        self.has_weights = True
        return received

    @ray.method(concurrency_group="sync")
    def sleep(self) -> None:
        """Colocated with the trainer: free the GPU memory while it steps (paper's hybrid deployment)."""
        self.engine.sleep()

    @ray.method(concurrency_group="sync")
    def wake(self) -> None:
        self.engine.wake()

    @ray.method(concurrency_group="generate")
    def rollout(self, table: pa.Table, params: SamplingParams) -> pa.Table:
        if not self.has_weights:
            raise NeedsWeights("this rollout actor was restarted and has not received the current weights")
        import time

        start = time.perf_counter()
        out = continue_segments(self.engine, table, params)
        self.generated["seconds"] += time.perf_counter() - start
        self.generated["tokens"] += sum(out["length"].to_pylist()) - sum(table["length"].to_pylist())
        return out

    @ray.method(concurrency_group="sync")
    def generation_stats(self) -> dict:
        """New tokens generated and seconds spent generating, since the actor started."""
        return dict(self.generated)

    def version(self) -> int:
        return self.engine.version


def was_restarted() -> bool:
    """True in an actor that Ray has restarted after its process died."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ray.get_runtime_context().was_current_actor_reconstructed

