"""Structured config: the schema Hydra merges conf/ into, so a typo or a wrong type fails at start."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    vocab_size: Optional[int] = None  # pad the default model's embedding to this (e.g. 151936 as Qwen2)


@dataclass
class VllmConfig:
    """Engine arguments of the vLLM rollout engine (rollout=vllm; k15/rollout/vllm_engine.py)."""
    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.5
    max_model_len: int = 4096
    enforce_eager: bool = False
    enable_sleep_mode: bool = True
    tensor_parallel_size: int = 1


@dataclass
class RolloutConfig:
    engine: str = "torch"  # torch | vllm
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
    sync_backend: str = "auto"  # auto | nccl | gloo (k15/sync); auto: NCCL between distinct GPUs
    dtype: Optional[str] = None  # the engine's weights (e.g. bfloat16); None: the model's
    overlap: bool = True  # rollouts run while the trainer steps (false: strictly alternate)
    sleep_during_training: bool = False  # colocated: engines free their GPU memory while the trainer steps
    vllm: VllmConfig = field(default_factory=VllmConfig)


@dataclass
class LengthPenaltyConfig:
    """Paper 2.3.3: a per-group length reward added to the reward with `weight`, from `start_iter` on."""
    weight: float = 0.0  # 0 turns it off
    start_iter: int = 1  # iterations before this one train without it (the paper's warm-up)


@dataclass
class AlgoConfig:
    name: str = "mirror_descent"  # mirror_descent | grpo | reinforce (k15/algo/losses.py)
    tau: float = 0.1  # mirror descent: weight of the KL to the iteration's reference
    clip_eps: float = 0.2  # grpo: ratio clipping
    samples_per_prompt: int = 8  # k
    prompts_per_iter: int = 32
    num_iters: int = 60
    max_token_staleness: int = -1  # tokens older than this many versions leave the loss; -1 keeps all
    length_penalty: LengthPenaltyConfig = field(default_factory=LengthPenaltyConfig)


@dataclass
class SamplerConfig:
    """Which problems each iteration draws (paper 2.3.4, k15/algo/sampler.py)."""
    name: str = "uniform"  # uniform | curriculum | prioritized
    # curriculum: problems sorted by difficulty; `step` draws from the easiest `start_fraction`
    # until `switch_iter`, then from the rest; `linear` widens the pool to all by `switch_iter`
    schedule: str = "step"
    start_fraction: float = 0.5
    switch_iter: int = 24
    # prioritized: P(i) ~ (1 - s_i) + floor, s_i an exponential moving average of problem i's
    # success rate; `prior` is s_i before the problem is first seen
    ema: float = 0.5
    prior: float = 0.5
    floor: float = 0.02


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
    # CUDA attention kernel on packed documents (k15/models/attention.py): cudnn (needs
    # nvidia-cudnn-frontend) | flash (FlashAttention-2, in PyTorch) | auto (cudnn where installed)
    attention: str = "auto"
    # Packed micro-batches (k15/trainer/packing.py): samples whole, up to this many tokens each;
    # gradients accumulate over a minibatch's micro-batches, however many its tokens make.
    micro_batch_tokens: int = 1024
    mixed_precision: bool = False  # bf16 compute, fp32 master weights and gradient reductions
    activation_checkpointing: bool = False  # recompute each layer in backward (long sequences)
    # Add a step's micro-batch gradients up unsharded, in fp32, and reduce them across ranks once per
    # optimizer step instead of once per micro-batch: fewer collectives and copies, for one full fp32
    # gradient per rank (4 bytes per parameter) during the step
    unsharded_grad_accumulation: bool = False
    compile: bool = False  # torch.compile each decoder layer (fused elementwise work around the GEMMs; CUDA)
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
    check_fraction: float = 0.0  # share of worked solutions that also verify the answer (long CoT)


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none
    project: str = "k15"
    mode: Optional[str] = None  # None: online if logged in, else offline


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: RAY_ADDRESS if set, else a local Ray; "auto": the one `ray start` started here
    num_cpus: Optional[int] = None  # logical CPUs of a local Ray (None: enough for the actors)
    reward_workers: int = 1
    trainer_workers: int = 1  # Ray Train workers (FSDP2 ranks), each with cluster.trainer_resources
    max_actor_restarts: int = 5  # Ray restarts a rollout or reward actor whose process dies this often
    # Resources of each trainer worker (Ray Train's placement) and of each rollout actor (one bundle
    # each in k15/cluster.py's placement group). Custom resources (e.g. rollout_node: 0.01) steer
    # them to node types of an autoscaling cluster.
    trainer_resources: Dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    rollout_resources: Dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    placement_timeout_s: float = 900.0  # an autoscaler may need minutes to start GPU nodes


@dataclass
class CheckpointConfig:
    """Run checkpoints for `k15 train resume=<run dir>` (k15/checkpoint.py)."""
    every: int = 10  # iterations between checkpoints (0: none; the final policy is saved either way)
    keep: int = 3  # newest checkpoints kept; older ones are deleted once a new one is complete
    max_failures: int = 3  # times a run restarts itself from its newest checkpoint when an actor it cannot replace dies


@dataclass
class ServeConfig:
    """`k15 serve` (k15/serve/policy.py): the policy at model.path behind an OpenAI-compatible API."""
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: Optional[str] = None  # the `model` clients send; None: the checkpoint directory's name
    follow: Optional[str] = None  # a training run's directory: serve its newest checkpoint as they appear
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    stream_chunk: int = 8  # tokens generated per streamed step
    device: str = "cpu"
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0  # Serve adds replicas above this many requests each
    max_ongoing_requests: int = 8
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0


@dataclass
class EvalConfig:
    """`k15 eval`: pass@k on a prompt set (k15/eval_report.py)."""
    source: Optional[str] = None  # .jsonl / .parquet file; None: the held-out set of `data`
    samples: int = 8  # n samples per problem (the unbiased pass@k needs n >= k)
    ks: List[int] = field(default_factory=lambda: [1, 4, 8])
    temperature: float = 1.0  # 0: greedy, one sample per problem
    max_response_tokens: Optional[int] = None  # None: rollout.max_response_tokens
    limit: Optional[int] = None  # evaluate only the first `limit` problems
    output: Optional[str] = None  # results directory; None: runs/eval-<timestamp>


@dataclass
class CurateConfig:
    """`k15 curate` (paper 2.1): difficulty from sampling, drop easy-to-hack and unverifiable problems."""
    source: Optional[str] = None  # .jsonl / .parquet file; None: the built-in task's training set
    output: Optional[str] = None  # curated Parquet; None: <source stem>.curated.parquet
    samples: int = 10  # attempts per problem with chain of thought, at `temperature`
    temperature: float = 1.2
    no_cot_attempts: int = 8  # solved within this many direct answers: easy to hack, dropped
    no_cot_prefix: str = " The answer is \\boxed{"  # forced start of a direct (no-CoT) answer
    no_cot_max_tokens: int = 12
    max_response_tokens: Optional[int] = None  # None: rollout.max_response_tokens
    limit: Optional[int] = None


@dataclass
class Long2ShortConfig:
    """`k15 long2short method=merge|shortest|dpo|rl` (paper 2.4, k15/long2short/): a short-CoT policy
    from the long-CoT one at model.path. `method=` picks conf/method/<name>.yaml, which sets `method`
    and that method's defaults (rl: the length penalty and max response length, under algo/rollout)."""
    method: Optional[str] = None
    output: Optional[str] = None  # run directory; None: runs/long2short-<method>-<timestamp>
    short_model: Optional[str] = None  # merge: the short-CoT checkpoint averaged with model.path
    merge_weights: List[float] = field(default_factory=lambda: [0.5, 0.5])  # of (model.path, short_model)
    problems: int = 1024  # shortest / dpo: training problems sampled from the long policy
    samples: int = 8  # n samples per problem
    temperature: float = 1.0
    rounds: int = 1  # shortest: sample -> keep the shortest correct -> SFT, repeated from each round's policy
    steps: int = 200  # shortest (SFT) / dpo: optimizer steps
    batch_size: int = 32  # examples (dpo: pairs) per step
    lr: float = 1e-4
    beta: float = 0.1  # dpo: strength of the preference (and of the pull to the reference)
    longer_factor: float = 1.5  # dpo: a correct response this many times longer than the chosen is rejected
    max_pairs_per_problem: int = 4  # dpo
    eval_after: bool = True  # greedy held-out accuracy and length of the long and the new policy


@dataclass
class K15Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    long2short: Long2ShortConfig = field(default_factory=Long2ShortConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Verifier settings (k15.reward.verifiers.RewardConfig: math timeout, sandbox limits); checked
    # at start by RewardConfig.from_dict, which names an unknown key.
    reward: Dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    run_dir: Optional[str] = None  # None: runs/<timestamp>; the final policy goes to <run_dir>/checkpoint
    eval_before: bool = True
    eval_after: bool = True
    resume: Optional[str] = None  # a run dir, one of its checkpoints, or `latest`: continue that run
    # Same seed, same run, bit for bit on CPU: rollout waves in lockstep, no overlap of rollouts
    # with training, deterministic torch kernels. Slower; for debugging and resume tests.
    deterministic: bool = False
