"""The trainer actor: supervised fine-tuning (the warm-up), DPO, one RL iteration at a time, weight
publishing.

Each iteration keeps the weights it starts from as the reference pi_theta_i: old log-probs come
from the same function as the new ones (Delta_j = 0 at the first step), and the optimizer state is
reset, as the paper prescribes.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pyarrow as pa
import ray
import torch

from k15.algo.dpo import dpo_loss
from k15.algo.grpo import grpo_loss
from k15.algo.loss import mirror_descent_loss
from k15.algo.reinforce import reinforce_loss
from k15.trainer.logprobs import pad_batch, token_logprobs


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


@ray.remote
class Trainer:
    def __init__(self, model_cfg, trainer_cfg, algo_cfg, temperature: float, seed: int, device: str = "cpu",
                 deterministic: bool = False):
        from k15.models import load_policy, load_policy_tokenizer

        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(trainer_cfg.num_threads)
        self.cfg, self.algo, self.temperature = trainer_cfg, algo_cfg, temperature
        self.tokenizer = load_policy_tokenizer(model_cfg)
        self.model = load_policy(model_cfg, self.tokenizer, seed).to(device)
        self.device = torch.device(device)
        self.pad_id = self.tokenizer.pad_token_id
        self.version = 0
        self.sender = None
        self.rng = random.Random(seed)
        self.loss_fn = policy_loss(algo_cfg)

    def pid(self) -> int:
        import os

        return os.getpid()

    # -- weights -----------------------------------------------------------------------------
    def weight_meta(self):
        from k15.sync.buckets import meta_of

        return meta_of(self.model.named_parameters())

    def gpu(self) -> str | None:
        from k15.sync import gpu_identity

        return gpu_identity(self.device)

    def new_weight_group(self, backend: str, world_size: int):
        """Made here, on rank 0: the gloo store lives on this node; NCCL's unique id names this process."""
        from k15.sync import new_group

        return new_group(backend, world_size)

    def init_sync(self, info, bucket_bytes: int) -> None:
        from k15.sync import make_sender

        if self.sender is not None:
            self.sender.close()
        self.sender = make_sender(info, bucket_bytes, self.device if self.device.type == "cuda" else None)

    def publish(self) -> dict:
        """Broadcast the current weights to every rollout actor (they call receive_weights)."""
        start = time.perf_counter()
        sent = self.sender.send(self.model.named_parameters())
        return {"version": self.version, "bytes": sent, "seconds": time.perf_counter() - start}

    def save(self, path: str) -> str:
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def save_state(self, path: str) -> None:
        """The policy and what continues it exactly. No optimizer state: RL iterations start a fresh
        optimizer (see train_iteration), so between iterations there is none."""
        from pathlib import Path

        self.save(str(Path(path) / "model"))
        torch.save({"version": self.version, "rng": self.rng.getstate(), "torch_rng": torch.get_rng_state()},
                   Path(path) / "trainer_state.pt")

    def load_state(self, path: str) -> int:
        """Weights and state from save_state(path); returns the policy version."""
        from pathlib import Path

        from k15.models.model import load_pretrained

        saved = load_pretrained(Path(path) / "model", dtype=next(self.model.parameters()).dtype)
        self.model.load_state_dict(saved.state_dict())
        state = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
        self.version = state["version"]
        self.rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        return self.version

    # -- supervised fine-tuning and preference optimisation -----------------------------------
    def sft(self, examples: list[tuple[list[int], list[int]]], steps: int, batch_size: int, lr: float,
            num_threads: int) -> dict:
        """Next-token cross-entropy on the response tokens of (prompt, response) examples: the long-CoT
        warm-up, and shortest-rejection fine-tuning (long2short)."""
        from tqdm import tqdm

        torch.set_num_threads(num_threads)
        self.model.train()
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
        losses, start = [], time.perf_counter()
        for _ in tqdm(range(steps), desc="SFT", mininterval=2.0, leave=False):
            batch = [examples[self.rng.randrange(len(examples))] for _ in range(batch_size)]
            ids, att, resp = pad_batch([p for p, _ in batch], [r for _, r in batch], self.pad_id)
            logp = token_logprobs(self.model, ids.to(self.device), att.to(self.device), 1.0, self.cfg.logprob_impl)
            resp = resp.to(self.device)
            loss = -(logp * resp).sum() / resp.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
        torch.set_num_threads(self.cfg.num_threads)
        return {"loss": float(np.mean(losses[-20:])), "seconds": time.perf_counter() - start}

    def dpo(self, triples: list[tuple[list[int], list[int], list[int]]], steps: int, batch_size: int, lr: float,
            beta: float, num_threads: int) -> dict:
        """DPO (k15.algo.dpo) on (prompt, chosen, rejected) token lists. The reference is the policy
        as it is now: its sequence log-probs are computed once, before the first step, through the
        same log-prob path (trainer.logprob_impl) as the policy's."""
        from tqdm import tqdm

        torch.set_num_threads(num_threads)
        start = time.perf_counter()
        self.model.eval()
        with torch.no_grad():
            ref = torch.cat([self._pair_logprobs(triples[i:i + batch_size]) for i in range(0, len(triples), batch_size)])
        self.model.train()
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
        stats = []
        for _ in tqdm(range(steps), desc="DPO", mininterval=2.0, leave=False):
            picks = [self.rng.randrange(len(triples)) for _ in range(batch_size)]
            logp = self._pair_logprobs([triples[i] for i in picks])
            loss, st = dpo_loss(logp[:, 0], logp[:, 1], ref[picks, 0], ref[picks, 1], beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            opt.step()
            stats.append((st.loss, st.accuracy, st.margin))
        torch.set_num_threads(self.cfg.num_threads)
        last = np.mean(stats[-20:], axis=0)
        return {"dpo_loss": float(last[0]), "dpo_pair_accuracy": float(last[1]), "dpo_margin": float(last[2]),
                "seconds": time.perf_counter() - start}

    def _pair_logprobs(self, triples) -> torch.Tensor:
        """[pairs, 2] summed response log-probs of (chosen, rejected), both in one padded batch."""
        prompts = [p for p, _, _ in triples]
        ids, att, resp = pad_batch(prompts + prompts, [c for _, c, _ in triples] + [r for _, _, r in triples],
                                   self.pad_id)
        logp = token_logprobs(self.model, ids.to(self.device), att.to(self.device), 1.0, self.cfg.logprob_impl)
        sums = (logp * resp.to(self.device)).sum(dim=1)
        return torch.stack([sums[:len(triples)], sums[len(triples):]], dim=1)

    # -- reinforcement learning --------------------------------------------------------------
    def train_iteration(self, table: pa.Table, rewards: list[float] | None = None) -> dict:
        """One iteration of the policy loss (`algo.name`) on complete groups of k samples (rows of a
        group adjacent). `rewards` replaces the table's rewards (e.g. with the length reward added)."""
        start = time.perf_counter()
        k = self.algo.samples_per_prompt
        rows = table.select(["prompt_tokens", "response_tokens", "versions", "reward"]).to_pydict()
        rewards = torch.tensor(rows["reward"] if rewards is None else rewards, dtype=torch.float32)
        ids, att, resp = pad_batch(rows["prompt_tokens"], rows["response_tokens"], self.pad_id)
        trained = resp & self._trained_token_mask(rows["versions"], resp)
        ids, att, trained = ids.to(self.device), att.to(self.device), trained.to(self.device)

        self.model.eval()
        with torch.no_grad():  # pi_theta_i: the reference is the weights at the start of the iteration
            old = torch.cat([token_logprobs(self.model, ids[s], att[s], self.temperature, self.cfg.logprob_impl)
                             for s in self._minibatches(len(rewards), k)])
        self.model.train()
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, betas=(0.9, 0.98),
                                weight_decay=self.cfg.weight_decay)  # optimizer state reset every iteration
        stats = []
        for _ in range(self.cfg.updates_per_iter):
            for s in self._minibatches(len(rewards), k):
                logp = token_logprobs(self.model, ids[s], att[s], self.temperature, self.cfg.logprob_impl)
                mask = trained[s]
                seq = torch.arange(mask.shape[0], device=self.device)[:, None].expand_as(mask)
                loss, st = self.loss_fn(logp[mask], old[s][mask], seq[mask], rewards[s].to(self.device), k)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
                opt.step()
                stats.append((st.loss, st.mean_log_ratio, grad_norm.item()))
        self.version += 1
        versions = [v for vs in rows["versions"] for v in vs if v >= 0]  # policy tokens only
        return {
            "loss": float(np.mean([s[0] for s in stats])),
            "log_ratio": float(np.mean([s[1] for s in stats])),
            "grad_norm": float(np.mean([s[2] for s in stats])),
            "trained_tokens": int(trained.sum().item()),
            "staleness": float(self.version - 1 - np.mean(versions)) if versions else 0.0,
            "max_staleness": int(self.version - 1 - min(versions)) if versions else 0,
            "train_seconds": time.perf_counter() - start,
            "version": self.version,
        }

    def _trained_token_mask(self, versions: list[list[int]], resp: torch.Tensor) -> torch.Tensor:
        """Which response tokens enter the loss: not environment tokens (version -1: tool results
        and user turns of a multi-turn episode), and not tokens generated more than
        algo.max_token_staleness versions ago (-1 keeps every segment)."""
        limit = self.algo.max_token_staleness
        mask = torch.ones_like(resp)
        for b, vs in enumerate(versions):
            start = int(resp[b].nonzero()[0]) if resp[b].any() else 0
            v = torch.tensor(vs, dtype=torch.long)
            keep = v >= 0
            if limit >= 0:
                keep &= v >= self.version - limit
            mask[b, start:start + len(vs)] = keep
        return mask

    def _minibatches(self, num_rows: int, k: int) -> list[slice]:
        groups = num_rows // k
        per = max(1, math.ceil(groups / self.cfg.minibatches_per_iter))
        return [slice(g * k, min(groups, g + per) * k) for g in range(0, groups, per)]
