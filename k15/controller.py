"""The master (paper 2.6): runs RL iterations over Ray actors.

    warm up -> publish weights -> evaluate
    for each iteration:
        keep rollout actors busy (fresh prompts x k, plus unfinished segments to resume),
            within the staleness bound; scored samples land in the replay buffer
        take complete groups of k from the buffer
        trainer: old log-probs, mirror-descent step(s)  (rollouts go on meanwhile)
        publish the new weights to every rollout actor
    evaluate, summarise
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from omegaconf import OmegaConf

from k15.algo.length_penalty import length_rewards, penalty_weight
from k15.algo.sampler import make_sampler
from k15.buffer import ReplayBuffer
from k15.data import arithmetic
from k15.data.dataset import builtin_problems, load_datasets
from k15.evaluate import evaluate, fresh_rows
from k15.metrics import RunLogger, console
from k15.models import load_policy_tokenizer
from k15.reward.pool import RewardPool
from k15.rollout.actor import RolloutActor
from k15.rollout.engine import SamplingParams
from k15.schema import SEGMENT_SCHEMA
from k15.sync.broadcast import new_group_info
from k15.trainer.trainer import Trainer


def init_ray(cluster_cfg, cpus_needed: int) -> None:
    if ray.is_initialized():
        return
    address = cluster_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = cluster_cfg.num_cpus or max(os.cpu_count() or 1, cpus_needed)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


class Controller:
    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.algo, self.rcfg = cfg.algo, cfg.rollout
        self.k = cfg.algo.samples_per_prompt
        self.tokenizer = load_policy_tokenizer(cfg.model)
        self.train_set, self.eval_set = load_datasets(cfg.data, cfg.seed)
        self.train_tokens = [self.tokenizer(r["prompt"])["input_ids"] for r in self.train_set]
        self.eval_tokens = [self.tokenizer(r["prompt"])["input_ids"] for r in self.eval_set]
        self.sampler = make_sampler(cfg.sampler, self.train_set, cfg.seed)
        self.problem_index = {r["prompt_id"]: i for i, r in enumerate(self.train_set)}
        self.logger = RunLogger(self.run_dir, OmegaConf.to_container(cfg), cfg.logger.backend,
                                cfg.logger.project, cfg.logger.mode)

        n = self.rcfg.num_workers
        init_ray(cfg.cluster, cpus_needed=1 + n)
        tokenizer_dir = cfg.model.tokenizer or cfg.model.path
        self.buffer = ReplayBuffer.remote(self.k)
        self.reward_pool = RewardPool(cfg.cluster.reward_workers, tokenizer_dir, self.rcfg.repeat_penalty,
                                      config=cfg.reward)
        self.trainer = Trainer.options(num_cpus=1).remote(cfg.model, cfg.trainer, cfg.algo, self.rcfg.temperature,
                                                          cfg.seed, cfg.trainer.device)
        self.rollouts = [RolloutActor.options(num_cpus=1).remote(cfg.model, cfg.seed, self.rcfg.num_threads,
                                                                 self.rcfg.device) for _ in range(n)]
        info = new_group_info(world_size=1 + n)
        bucket = self.rcfg.bucket_mb << 20
        ray.get([self.trainer.init_sync.remote(info, bucket)]
                + [a.init_sync.remote(info, i + 1, bucket) for i, a in enumerate(self.rollouts)])
        self.weight_meta = ray.get(self.trainer.weight_meta.remote())
        self.version = 0
        self.waves_launched = 0  # one wave = one rollout call on one actor
        self.inflight: dict[ray.ObjectRef, int] = {}  # buffer.add ref -> actor index
        self.draws = 0
        self.prompts_launched = 0  # fresh prompts drawn so far (each fans out to k samples)

    # -- the paper's loop ---------------------------------------------------------------------
    def run(self) -> dict:
        summary = {"run_dir": str(self.run_dir)}
        summary.update(self.warmup())
        self.publish_weights()
        if self.cfg.eval_before:
            summary["accuracy_before"] = self.evaluate(iteration=0)["eval_accuracy"]
        start = time.perf_counter()
        for it in range(1, self.algo.num_iters + 1):
            t0 = time.perf_counter()
            batch = self.collect_groups(it)
            t1 = time.perf_counter()
            self.record_success(batch)
            rewards, shaping = self.shaped_rewards(batch, it)
            train = self.wait_keeping_rollouts_busy(self.trainer.train_iteration.remote(batch, rewards), it)
            t2 = time.perf_counter()
            self.publish_weights(version=train["version"])
            t3 = time.perf_counter()
            metrics = {"iter": it, **batch_metrics(batch), **shaping, **train, "wait_seconds": t1 - t0,
                       "sync_seconds": t3 - t2, "iter_seconds": t3 - t0,
                       "tokens_per_s": train["trained_tokens"] / max(t3 - t0, 1e-9)}
            self.logger.log(metrics, step=it)
            console.print(self.logger.iteration_line(metrics))
        self.drain()
        summary["rl_seconds"] = time.perf_counter() - start
        summary["trained_samples"] = self.algo.num_iters * self.algo.prompts_per_iter * self.k
        if self.cfg.eval_after:
            summary["accuracy_after"] = self.evaluate(iteration=self.algo.num_iters)["eval_accuracy"]
        summary["checkpoint"] = self.save_checkpoint()
        summary["buffer"] = ray.get(self.buffer.stats.remote())
        return summary

    def shaped_rewards(self, batch: pa.Table, it: int) -> tuple[list[float], dict]:
        """The verifier's rewards plus the length reward (paper 2.3.3), once it is warmed up."""
        rewards = np.array(batch["reward"].to_pylist(), dtype=float)
        weight = penalty_weight(it, self.algo.length_penalty.weight, self.algo.length_penalty.start_iter)
        bonus = np.zeros_like(rewards)
        if weight:
            bonus = length_rewards(batch["length"].to_pylist(), rewards >= 1.0, self.k)
        return (rewards + weight * bonus).tolist(), {"length_penalty_weight": weight,
                                                     "length_reward": float(bonus.mean())}

    def record_success(self, batch: pa.Table) -> None:
        """Each group's fraction of correct answers, for the prioritized sampler."""
        ids = batch["prompt_id"].to_pylist()
        correct = np.array(batch["reward"].to_pylist(), dtype=float) >= 1.0
        for g in range(0, len(ids), self.k):
            index = self.problem_index.get(ids[g].rsplit("@", 1)[0])
            if index is not None:
                self.sampler.update(index, float(correct[g:g + self.k].mean()))

    # -- phases -------------------------------------------------------------------------------
    def warmup(self) -> dict:
        """Supervised warm-up on worked solutions of the built-in task (the paper's long-CoT SFT,
        scaled down). A mix of direct answers and worked solutions, as a base model might write."""
        tcfg = self.cfg.trainer
        if tcfg.warmup_steps <= 0 or self.cfg.data.source != "builtin":
            return {}
        rng = random.Random(self.cfg.seed)
        problems, _ = builtin_problems(self.cfg.data, self.cfg.seed)
        examples = []
        for p in problems:
            if rng.random() < self.cfg.data.cot_fraction:
                solution = arithmetic.worked_solution(p, check=rng.random() < self.cfg.data.check_fraction)
            else:
                solution = arithmetic.direct_solution(p)
            examples.append((self.tokenizer(p.prompt)["input_ids"],
                             self.tokenizer(solution)["input_ids"] + [self.tokenizer.eos_token_id]))
        console.print(f"warm-up: {tcfg.warmup_steps} SFT steps on {len(examples)} worked examples")
        sft = ray.get(self.trainer.sft.remote(examples, tcfg.warmup_steps, tcfg.warmup_batch_size,
                                              tcfg.warmup_lr, tcfg.warmup_threads))
        out = {"warmup_loss": sft["loss"], "warmup_seconds": sft["seconds"]}
        console.print(f"warm-up done in {out['warmup_seconds']:.1f}s, loss {out['warmup_loss']:.3f}")
        self.logger.log(out)
        return out

    def publish_weights(self, version: int = 0) -> None:
        """Bucketed broadcast from the trainer into every rollout actor; the actors swap the new
        weights in between decoding steps, even in the middle of a rollout."""
        ray.get([self.trainer.publish.remote()]
                + [a.receive_weights.remote(self.weight_meta, version) for a in self.rollouts])
        self.version = version

    def save_checkpoint(self) -> str:
        """The policy (a Hugging Face directory: `model.path=` loads it) and the sampler's state."""
        path = self.run_dir / "checkpoint"
        ray.get(self.trainer.save.remote(str(path)))
        (path / "sampler.json").write_text(json.dumps(self.sampler.state_dict()))
        return str(path)

    def evaluate(self, iteration: int) -> dict:
        self.drain()  # held-out numbers come from the current weights only
        out = evaluate(self.rollouts, self.reward_pool, self.eval_set, self.eval_tokens, self.rcfg.max_response_tokens)
        self.logger.log({"iter": iteration, **out}, step=iteration)
        console.print(f"held-out accuracy at iteration {iteration}: {out['eval_accuracy']:.3f} on "
                      f"{out['eval_problems']} problems (greedy), mean length {out['eval_mean_length']:.1f}")
        return out

    # -- rollouts -----------------------------------------------------------------------------
    def collect_groups(self, it: int) -> pa.Table:
        """Keep rollouts going until the buffer holds this iteration's groups, then take them."""
        need = self.algo.prompts_per_iter
        while True:
            self.launch_waves(it)
            if ray.get(self.buffer.num_ready_groups.remote()) >= need:
                break
            if not self.inflight:
                raise RuntimeError("no rollout in flight and too few complete groups: nothing can finish them")
            self._wait_one()
        if not self.rcfg.overlap:
            self.drain()  # strictly alternate: no rollout runs while the trainer steps
        return ray.get(self.buffer.take_groups.remote(need))

    def wait_keeping_rollouts_busy(self, ref, it: int):
        """Wait for `ref` (a training step) while idle rollout actors start new waves."""
        while True:
            if self.rcfg.overlap:
                self.launch_waves(it)
            ready, _ = ray.wait([ref] + list(self.inflight), num_returns=1)
            if ref in ready:
                return ray.get(ref)
            self._finish(ready)

    def launch_waves(self, it: int) -> None:
        """Start a wave on every idle actor. Fresh prompts may be drawn for iterations up to
        version + 1 + max_staleness (with overlap off: only for the next iteration); unfinished
        segments are always resumed, since the groups they belong to are already counted."""
        lead = self.rcfg.max_staleness if self.rcfg.overlap else 0
        busy = set(self.inflight.values())
        for i in range(len(self.rollouts)):
            if i in busy:
                continue
            room = (self.version + 1 + lead) * self.algo.prompts_per_iter - self.prompts_launched
            if not self.launch_wave(i, max_fresh=max(0, room)):
                return

    def launch_wave(self, actor_index: int, max_fresh: int) -> bool:
        """One rollout call: unfinished segments first (partial rollouts resume with the newest
        weights), then fresh prompts x k to fill the wave to its share of an iteration. Returns
        False when there was nothing to do."""
        n = len(self.rollouts)
        resume = ray.get(self.buffer.take_unfinished.remote())
        per_actor = -(-self.algo.prompts_per_iter // n)
        num_fresh = min(max_fresh, max(0, per_actor - resume.num_rows // self.k))
        if resume.num_rows == 0 and num_fresh == 0:
            return False
        iteration = self.prompts_launched // self.algo.prompts_per_iter + 1  # the one these prompts feed
        picks = self.sampler.sample(num_fresh, iteration) if num_fresh else []
        self.prompts_launched += num_fresh
        self.draws += 1
        rows = [row for n, i in enumerate(picks)  # a problem drawn twice still gets distinct sample ids
                for row in fresh_rows([self.train_set[i]], [self.train_tokens[i]], self.k, f"@{self.draws}.{n}")]
        table = pa.concat_tables([resume, pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)])
        params = SamplingParams(temperature=self.rcfg.temperature, top_p=self.rcfg.top_p,
                                max_response_tokens=self.rcfg.max_response_tokens, token_budget=self.rcfg.token_budget,
                                repeat_ngram=self.rcfg.repeat_ngram, repeat_times=self.rcfg.repeat_times,
                                seed=self.cfg.seed * 1_000_003 + self.waves_launched)
        generated = self.rollouts[actor_index].rollout.remote(table, params)
        added = self.buffer.add.remote(self.reward_pool.score(generated))
        self.inflight[added] = actor_index
        self.waves_launched += 1
        return True

    def _wait_one(self) -> None:
        ready, _ = ray.wait(list(self.inflight), num_returns=1)
        self._finish(ready)

    def _finish(self, refs) -> None:
        for ref in refs:
            self.inflight.pop(ref, None)
            ray.get(ref)  # surfaces an actor's error here

    def drain(self) -> None:
        while self.inflight:
            self._wait_one()


def batch_metrics(batch: pa.Table) -> dict:
    rewards = np.array(batch["reward"].to_pylist(), dtype=float)
    lengths = np.array(batch["length"].to_pylist(), dtype=float)
    reasons = batch["finish_reason"].to_pylist()
    return {"reward": float(rewards.mean()), "accuracy": float((rewards >= 1.0).mean()),
            "mean_length": float(lengths.mean()), "p95_length": float(np.percentile(lengths, 95)),
            "repeat_fraction": reasons.count("repeat") / len(reasons),
            "truncated_fraction": reasons.count("length") / len(reasons),
            "resumed_fraction": float(np.mean(np.array(batch["num_segments"].to_pylist()) > 1))}
