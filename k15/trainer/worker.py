"""One rank of the trainer: supervised fine-tuning (the warm-up), DPO, one RL iteration at a time,
weight publishing, sharded checkpoints. Ray Train runs one per GPU (or one CPU process) and
k15/trainer/group.py drives them in lockstep; every rank runs the same method on the same
arguments and takes its share of the packed micro-batches.

Each iteration keeps the weights it starts from as the reference pi_theta_i: old log-probs come
from the same function as the new ones (Delta_j = 0 at the first step), and the optimizer state is
reset, as the paper prescribes.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from k15.algo.dpo import dpo_loss
from k15.algo.grpo import grpo_loss
from k15.algo.loss import LossStats, mirror_descent_loss, sequence_sums
from k15.algo.reinforce import reinforce_loss
from k15.trainer.packing import PackedBatch, Sample, pack, split_for_ranks
from k15.trainer.policy import PackedPolicy, shard


def policy_loss(algo_cfg):
    """fn(logp, old_logp, seq_ids, rewards, k) -> (loss, LossStats) for `algo.name`."""
    name = algo_cfg.name
    if name == "mirror_descent":
        return lambda *a: mirror_descent_loss(*a, tau=algo_cfg.tau)
    if name == "grpo":
        return lambda *a: grpo_loss(*a, clip_eps=algo_cfg.clip_eps)
    if name == "reinforce":
        return reinforce_loss
    raise ValueError(f"algo.name must be mirror_descent, grpo or reinforce, got {name!r}")


def response_sample(prompt: list[int], response: list[int], seq_id: int, keep: list[bool] | None = None) -> Sample:
    """prompt + response, trained on the response tokens (those with keep[i], if given)."""
    keep = [True] * len(response) if keep is None else keep
    return Sample(prompt + response, [False] * (len(prompt) - 1) + list(keep), seq_id)


class TrainerWorker:
    def __init__(self, model_cfg, trainer_cfg, algo_cfg, temperature: float, seed: int, device: str = "cpu",
                 deterministic: bool = False):
        from k15.models import load_policy, load_policy_tokenizer

        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(trainer_cfg.num_threads)
        self.cfg, self.algo, self.temperature = trainer_cfg, algo_cfg, temperature
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device)
        self.tokenizer = load_policy_tokenizer(model_cfg)
        hf = load_policy(model_cfg, self.tokenizer, seed)
        self.vocab_size = hf.get_input_embeddings().num_embeddings
        self.policy = shard(PackedPolicy(hf.to(self.device), trainer_cfg.logprob_impl, trainer_cfg.attention),
                            trainer_cfg.mixed_precision, trainer_cfg.activation_checkpointing, trainer_cfg.compile)
        self.model = self.policy.hf  # the Hugging Face model: its parameter names are the engines'
        self.pad_id = self.tokenizer.pad_token_id
        self.version = 0
        self.sender = None
        self.rng = random.Random(seed)
        self.loss_fn = policy_loss(algo_cfg)

    def pid(self) -> int:
        return os.getpid()

    # -- packed micro-batches ----------------------------------------------------------------
    def _micro_batches(self, samples: list[Sample]) -> list[PackedBatch]:
        """This rank's micro-batches of `samples`: packed into trainer.micro_batch_tokens (padded
        to exactly that on CUDA, one shape for the compiled attention), shared out by tokens."""
        for s in samples:  # here, on the host, rather than as a device-side assert in the embedding
            if s.tokens and not 0 <= min(s.tokens) <= max(s.tokens) < self.vocab_size:
                bad = next(t for t in s.tokens if not 0 <= t < self.vocab_size)
                raise ValueError(f"sample {s.seq_id}: token id {bad} is outside the policy's vocabulary "
                                 f"(0..{self.vocab_size - 1})")
        packed = pack(samples, self.cfg.micro_batch_tokens, self.pad_id, pad_to_budget=self.device.type == "cuda")
        return [b.to(self.device) for b in split_for_ranks(packed, self.world, self.rank)]

    def _logprobs(self, batch: PackedBatch) -> torch.Tensor:
        return self.policy(batch, self.temperature)

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _step(self, opt) -> torch.Tensor:
        """Clip (the norm over every shard) and apply the accumulated gradient. Returns the norm as a
        tensor: reading it here would make the host wait for the GPU at every step."""
        norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).detach()

    def _policy_step(self, micro: PackedBatch, old_logp: torch.Tensor, rewards: torch.Tensor, last: bool = True):
        """Forward, policy loss and backward of one micro-batch (gradients add up over calls; `last`:
        the optimizer step's last micro-batch); returns the loss's LossStats. rewards: the whole
        minibatch's, indexed by seq_id."""
        logp = self._logprobs(micro)
        rows = micro.trained_rows  # made on the host: selecting by it needs no synchronisation
        loss, stats = self.loss_fn(logp[rows], old_logp[rows], micro.seq_ids[rows], rewards,
                                   self.algo.samples_per_prompt)
        self._backward(loss, logp, last)
        return stats

    def _backward(self, loss: torch.Tensor, logp: torch.Tensor, last: bool = True) -> None:
        """FSDP averages gradients over ranks; each rank's loss is its share of a sum, so scale back.
        The 0 * logp term keeps an empty micro-batch's backward (and its collectives) running.
        With trainer.unsharded_grad_accumulation, gradients are reduced after the step's last one only."""
        self.policy.set_requires_gradient_sync(last or not self.cfg.unsharded_grad_accumulation)
        (loss * self.world + 0.0 * logp.sum()).backward()

    def _optimizer(self, lr: float, weight_decay: float = 0.0):
        return torch.optim.AdamW(self.policy.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay,
                                 fused=self.device.type == "cuda")  # one kernel for all parameters

    # -- weights -----------------------------------------------------------------------------
    def weight_meta(self):
        from k15.sync.buckets import meta_of

        return meta_of(self.model.named_parameters())

    def gpu(self) -> str | None:
        from k15.sync import gpu_identity

        return gpu_identity(self.device)

    def new_weight_group(self, backend: str, world_size: int):
        """Made on rank 0: the gloo store lives on its node; NCCL's unique id names its process."""
        from k15.sync import new_group

        return new_group(backend, world_size) if self.rank == 0 else None

    def init_sync(self, info, bucket_bytes: int) -> None:
        from k15.sync import make_sender

        self.bucket_bytes = bucket_bytes
        if self.rank != 0:
            return
        if self.sender is not None:
            self.sender.close()
        self.sender = make_sender(info, bucket_bytes, self.device if self.device.type == "cuda" else None)

    def publish(self) -> dict:
        """Broadcast the current weights to every rollout actor (they call receive_weights). Rank 0
        sends; the other ranks take part in gathering each sharded tensor, bucket by bucket."""
        from k15.sync.buckets import gather_along

        start = time.perf_counter()
        if self.rank != 0:
            gather_along(self.model.named_parameters(), self.bucket_bytes)
            return {}
        sent = self.sender.send(self.model.named_parameters())
        return {"version": self.version, "bytes": sent, "seconds": time.perf_counter() - start}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """The whole policy as a Hugging Face directory (for eval, serve and the rollout engines),
        gathered onto rank 0 one tensor at a time."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            self.model.save_pretrained(path, state_dict=state)
            self.tokenizer.save_pretrained(path)
        dist.barrier()
        return path

    def save_state(self, path: str) -> None:
        """Sharded weights (shards/: every rank writes its own; they load on any number of ranks),
        the policy as a Hugging Face directory (model/), and what continues the run exactly. No
        optimizer state: RL iterations start a fresh optimizer, so between iterations there is none."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp.save(get_model_state_dict(self.model), checkpoint_id=str(Path(path) / "shards"))
        self.save(str(Path(path) / "model"))
        if self.rank == 0:
            torch.save({"version": self.version, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state()},
                       Path(path) / "trainer_state.pt")
        dist.barrier()

    def load_state(self, path: str) -> int:
        """Weights and state from save_state(path), resharded to this run's ranks; returns the
        policy version."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = get_model_state_dict(self.model)
        dcp.load(state, checkpoint_id=str(Path(path) / "shards"))
        set_model_state_dict(self.model, state)
        saved = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
        self.version = saved["version"]
        self.rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        return self.version

    # -- supervised fine-tuning and preference optimisation -----------------------------------
    def sft(self, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float,
            num_threads: int) -> dict:
        """Next-token cross-entropy on the response tokens of (prompt, response) examples, averaged
        over the step's tokens: the long-CoT warm-up, and shortest-rejection fine-tuning."""
        from tqdm import tqdm

        torch.set_num_threads(num_threads)
        self.policy.train()
        opt = self._optimizer(lr)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        losses, start = [], time.perf_counter()
        for _ in tqdm(range(steps), desc="SFT", mininterval=2.0, leave=False, disable=self.rank != 0):
            batch = [examples[self.rng.randrange(len(examples))] for _ in range(batch_size)]
            tokens = sum(len(r) for _, r in batch)  # the same on every rank: one shared rng
            total = 0.0  # a tensor after the first micro-batch: read once per step, not per micro-batch
            micros = self._micro_batches([response_sample(p, r, i) for i, (p, r) in enumerate(batch)])
            for j, micro in enumerate(micros):
                logp = self._logprobs(micro)
                loss = -logp.sum() / tokens
                self._backward(loss, logp, last=j == len(micros) - 1)
                total = total + loss.detach()
            self._step(opt)
            sched.step()
            losses.append(self._all_sum([float(total)])[0])
        torch.set_num_threads(self.cfg.num_threads)
        return {"loss": float(np.mean(losses[-20:])), "seconds": time.perf_counter() - start}

    def dpo(self, triples: list[tuple[list[int], list[int], list[int]]], steps: int, batch_size: int, lr: float,
            beta: float, num_threads: int) -> dict:
        """DPO (k15.algo.dpo) on (prompt, chosen, rejected) token lists. The reference is the policy
        as it is now: its sequence log-probs are computed once, before the first step, through the
        same log-prob path as the policy's."""
        from tqdm import tqdm

        torch.set_num_threads(num_threads)
        start = time.perf_counter()
        self.policy.eval()
        with torch.no_grad():
            ref = torch.cat([self._pair_logprobs(triples[i:i + batch_size]) for i in range(0, len(triples), batch_size)])
        self.policy.train()
        opt = self._optimizer(lr)
        stats = []
        for _ in tqdm(range(steps), desc="DPO", mininterval=2.0, leave=False, disable=self.rank != 0):
            picks = [self.rng.randrange(len(triples)) for _ in range(batch_size)]
            logp = self._pair_logprobs([triples[i] for i in picks])
            loss, st = dpo_loss(logp[:, 0], logp[:, 1], ref[picks, 0], ref[picks, 1], beta)
            (loss * self.world).backward()
            self._step(opt)
            stats.append((st.loss, st.accuracy, st.margin))
        torch.set_num_threads(self.cfg.num_threads)
        last = np.mean(stats[-20:], axis=0)
        return {"dpo_loss": float(last[0]), "dpo_pair_accuracy": float(last[1]), "dpo_margin": float(last[2]),
                "seconds": time.perf_counter() - start}

    def _pair_logprobs(self, triples) -> torch.Tensor:
        """[pairs, 2] summed response log-probs of (chosen, rejected). Each rank computes the sums of
        its micro-batches; the others' arrive through an all-reduce, detached, so the gradient of a
        loss of all the sums flows into this rank's share only (and FSDP adds the shares up)."""
        samples = [response_sample(p, c, 2 * i) for i, (p, c, _) in enumerate(triples)]
        samples += [response_sample(p, r, 2 * i + 1) for i, (p, _, r) in enumerate(triples)]
        mine = torch.zeros(2 * len(triples), dtype=torch.float32, device=self.device)
        for micro in self._micro_batches(samples):
            logp = self._logprobs(micro)
            mine = mine + sequence_sums(logp, micro.seq_ids, len(samples)) + 0.0 * logp.sum()
        everyone = mine.detach().to(self._collective_device())
        dist.all_reduce(everyone)
        sums = mine + (everyone.to(self.device) - mine.detach())
        return sums.view(len(triples), 2)

    # -- reinforcement learning --------------------------------------------------------------
    def train_iteration(self, table: pa.Table, rewards: list[float] | None = None) -> dict:
        """One iteration of the policy loss (`algo.name`) on complete groups of k samples (rows of a
        group adjacent). `rewards` replaces the table's rewards (e.g. with the length reward added).

        Each minibatch (one optimizer step) is packed into micro-batches whose gradients add up to
        the minibatch's exactly: the losses are sums over sequences, each sequence lies whole in one
        micro-batch, and the group baselines come from the minibatch's rewards."""
        start = time.perf_counter()
        rows = table.select(["prompt_tokens", "response_tokens", "versions", "reward"]).to_pydict()
        rewards = torch.tensor(rows["reward"] if rewards is None else rewards, dtype=torch.float32)
        minibatches = []
        for s in self._minibatches(len(rewards), self.algo.samples_per_prompt):
            samples = [response_sample(rows["prompt_tokens"][j], rows["response_tokens"][j], j - s.start,
                                       self._trained_tokens(rows["versions"][j]))
                       for j in range(s.start, s.stop)]
            minibatches.append((self._micro_batches(samples), rewards[s].to(self.device)))

        self.policy.eval()
        with torch.no_grad():  # pi_theta_i: the reference is the weights at the start of the iteration
            old = [[self._logprobs(m) for m in micros] for micros, _ in minibatches]
        self.policy.train()
        opt = self._optimizer(self.cfg.lr, self.cfg.weight_decay)  # optimizer state reset every iteration
        sums, norms = [], []  # per optimizer step, on the device; read and summed over ranks once, at the end
        for _ in range(self.cfg.updates_per_iter):
            for (micros, mb_rewards), mb_old in zip(minibatches, old):
                stats = [self._policy_step(micro, old_logp, mb_rewards, last=j == len(micros) - 1).values
                         for j, (micro, old_logp) in enumerate(zip(micros, mb_old))]
                norms.append(self._step(opt))
                sums.append(torch.stack(stats).sum(0))
        self.version += 1
        trained = sum(m.num_trained for micros, _ in minibatches for m in micros)
        steps = [dict(zip(LossStats.FIELDS, s)) for s in torch.stack(sums).tolist()]
        totals = self._all_sum([x for s in steps for x in (s["loss"], s["mean_log_ratio"])] + [trained])
        versions = [v for vs in rows["versions"] for v in vs if v >= 0]  # policy tokens only
        return {
            "loss": float(np.mean(totals[:-1:2])),
            "log_ratio": float(np.mean(totals[1:-1:2])),
            "grad_norm": float(torch.stack(norms).mean()),
            "trained_tokens": int(totals[-1]),
            "staleness": float(self.version - 1 - np.mean(versions)) if versions else 0.0,
            "max_staleness": int(self.version - 1 - min(versions)) if versions else 0,
            "train_seconds": time.perf_counter() - start,
            "version": self.version,
        }

    def _trained_tokens(self, versions: list[int]) -> list[bool]:
        """Which response tokens enter the loss: not environment tokens (version -1: tool results
        and user turns of a multi-turn episode), and not tokens generated more than
        algo.max_token_staleness versions ago (-1 keeps every segment)."""
        limit = self.algo.max_token_staleness
        return [v >= 0 and (limit < 0 or v >= self.version - limit) for v in versions]

    def _minibatches(self, num_rows: int, k: int) -> list[slice]:
        groups = num_rows // k
        per = max(1, math.ceil(groups / self.cfg.minibatches_per_iter))
        return [slice(g * k, min(groups, g + per) * k) for g in range(0, groups, per)]
