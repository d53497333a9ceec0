"""Structured config: the schema Hydra merges conf/ into, so a typo or a wrong type fails at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING  # noqa: F401


@dataclass
class ModelConfig:
    path: Optional[str] = None  # local Hugging Face causal-LM directory; None builds the default
    tokenizer: Optional[str] = None  # tokenizer directory; None: the model's, else the shipped one
    dtype: str = "float32"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position: int = 256


@dataclass
class RolloutConfig:
    engine: str = "torch"
    num_workers: int = 1
    num_threads: int = 1  # torch threads per rollout actor
    device: str = "cpu"
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_tokens: int = 80
    token_budget: Optional[int] = 6144  # new tokens per actor per call; unfinished samples resume later
    max_staleness: int = 1  # policy versions a rollout may run ahead of the trainer
    repeat_ngram: int = 8  # 0 turns repeat detection off
    repeat_times: int = 4
    repeat_penalty: float = 0.0  # reward of a sample stopped for repeating is -repeat_penalty
    bucket_mb: int = 64  # weight-broadcast bucket size
    overlap: bool = True  # rollouts run while the trainer steps (false: strictly alternate)


@dataclass
class AlgoConfig:
    name: str = "mirror_descent"
    tau: float = 0.1
    samples_per_prompt: int = 8  # k
    prompts_per_iter: int = 32
    num_iters: int = 60
    max_token_staleness: int = -1  # tokens older than this many versions leave the loss; -1 keeps all


@dataclass
class TrainerConfig:
    num_threads: int = 1
    device: str = "cpu"
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    updates_per_iter: int = 1
    minibatches_per_iter: int = 2
    logprob_impl: str = "torch"  # torch | fused (k15.kernels)
    warmup_steps: int = 1200
    warmup_batch_size: int = 64
    warmup_lr: float = 3e-3
    warmup_threads: int = 2


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin, or a .jsonl / .parquet file of prompts
    eval_source: Optional[str] = None  # held-out file; None: built-in problems (or 10% of the file)
    train_size: int = 20000
    eval_size: int = 256
    min_ops: int = 3
    max_ops: int = 6
    max_value: int = 9
    cot_fraction: float = 0.5  # share of worked (chain-of-thought) solutions in the warm-up data


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "k15"
    mode: Optional[str] = None  # None: online if logged in, else offline


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a local Ray
    num_cpus: Optional[int] = None  # logical CPUs of a local Ray (None: enough for the actors)
    reward_workers: int = 1


@dataclass
class K15Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Verifier settings (k15.reward.verifiers.RewardConfig: math timeout, sandbox limits); checked
    # at start by RewardConfig.from_dict, which names an unknown key.
    reward: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    run_dir: Optional[str] = None  # None: runs/<timestamp>
    eval_before: bool = True
    eval_after: bool = True
