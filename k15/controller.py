"""The master (paper 2.6): runs RL iterations over Ray actors.

    warm up -> publish weights -> evaluate            (or: restore a checkpoint)
    for each iteration:
        keep rollout actors busy (fresh prompts x k, plus unfinished segments to resume),
            within the staleness bound; scored samples land in the replay buffer
        take complete groups of k from the buffer
        trainer: old log-probs, mirror-descent step(s)  (rollouts go on meanwhile)
        publish the new weights to every rollout actor
        every checkpoint.every iterations: checkpoint
    evaluate, summarise

Failures: a rollout actor that dies is restarted by Ray; the segments of its wave go back to the
buffer (re-queued once) and it rejoins the weight broadcast before it generates again. Reward
actors are restarted and their call retried by Ray. If a trainer worker (a Ray Train job,
k15/trainer/group.py) or the buffer dies, run() raises RunFailed and `k15 train` restarts the run
from its newest checkpoint.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from omegaconf import OmegaConf

from k15 import checkpoint
from k15.algo.length_penalty import length_rewards, penalty_weight
from k15.algo.sampler import make_sampler
from k15.buffer import ReplayBuffer
from k15.cluster import Placement, init_ray
from k15.data import arithmetic
from k15.data.dataset import builtin_problems, load_datasets
from k15.evaluate import evaluate, fresh_rows
from k15.metrics import RunLogger, console, rewind_jsonl
from k15.models import load_policy_tokenizer
from k15.reward.pool import RewardPool
from k15.rollout.actor import NeedsWeights, RolloutActor
from k15.rollout.engine import SamplingParams
from k15.schema import SEGMENT_SCHEMA
from k15.sync import choose_backend
from k15.trainer.group import TrainerDied, TrainerGroup
from k15.watch import ActorWatch


class RunFailed(RuntimeError):
    """The trainer or the replay buffer died: the run can only go on from a checkpoint."""


@dataclass
class Wave:
    """One rollout call on one actor, and what it took: given back to the buffer if the actor dies."""
    actor_index: int
    table: pa.Table
    generated: ray.ObjectRef


class Controller:
    def __init__(self, cfg, run_dir: Path, resume_from: Path | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.algo, self.rcfg = cfg.algo, cfg.rollout
        self.overlap = self.rcfg.overlap and not cfg.deterministic
        self.k = cfg.algo.samples_per_prompt
        self.tokenizer = load_policy_tokenizer(cfg.model)
        self.train_set, self.eval_set = load_datasets(cfg.data, cfg.seed)
        self.train_tokens = [self.tokenizer(r["prompt"])["input_ids"] for r in self.train_set]
        self.eval_tokens = [self.tokenizer(r["prompt"])["input_ids"] for r in self.eval_set]
        self.sampler = make_sampler(cfg.sampler, self.train_set, cfg.seed)
        self.problem_index = {r["prompt_id"]: i for i, r in enumerate(self.train_set)}
        self.start_iter = checkpoint.iteration_of(resume_from) + 1 if resume_from else 1
        self.logger = RunLogger(self.run_dir, OmegaConf.to_container(cfg), cfg.logger.backend,
                                cfg.logger.project, cfg.logger.mode, resume_after=self.start_iter - 1 if resume_from else None)
        self.samples_log = self.run_dir / "trained_samples.jsonl"  # which samples each iteration trained on

        n = self.rcfg.num_workers
        init_ray(cfg.cluster, cpus_needed=1 + n)
        self.watch = ActorWatch()  # says in the log, within a second, when any actor dies
        tokenizer_dir = cfg.model.tokenizer or cfg.model.path
        self.buffer = ReplayBuffer.remote(self.k)
        restarts = cfg.cluster.max_actor_restarts
        self.reward_pool = RewardPool(cfg.cluster.reward_workers, tokenizer_dir, self.rcfg.repeat_penalty,
                                      config=cfg.reward, max_restarts=restarts)
        self.placement = Placement(cfg.cluster, n)
        self.trainer = TrainerGroup(cfg.model, cfg.trainer, cfg.algo, self.rcfg.temperature, cfg.seed,
                                    num_workers=cfg.cluster.trainer_workers, resources=self.placement.trainer_bundle,
                                    device=cfg.trainer.device, storage_path=str(self.run_dir.resolve() / "ray_train"),
                                    deterministic=cfg.deterministic)
        self.rollouts = [RolloutActor.options(**self.placement.rollout(i), max_restarts=restarts).remote(
            cfg.model, self.rcfg, cfg.seed, follows_trainer=True) for i in range(n)]
        self.sync_backend = self.choose_sync_backend()
        self.connect_weights()
        self.weight_meta = ray.get(self.trainer.weight_meta.remote())
        self.version = 0
        self.waves_launched = 0  # one wave = one rollout call on one actor
        self.inflight: dict[ray.ObjectRef, Wave] = {}  # buffer.add ref -> its wave
        self.prompts_launched = 0  # fresh prompts drawn so far (each fans out to k samples)
        self.stale_actors: set[int] = set()  # restarted rollout actors waiting for the next publish
        self.training = False  # a trainer step is running (weights cannot be published meanwhile)
        self.rollout_failures = 0
        self.generation_seen = (0, 0.0)  # rollout tokens and generating seconds at the last iteration
        if resume_from:
            self.restore(resume_from)

    def close(self) -> None:
        """Stop the actor watch and let the trainer's Ray Train job end (before Ray stops: a job
        still polling from a thread at interpreter exit can take the process down with it)."""
        self.watch.stop()
        self.trainer.shutdown()

    # -- the paper's loop ---------------------------------------------------------------------
    def run(self) -> dict:
        summary = {"run_dir": str(self.run_dir)}
        fresh_start = self.start_iter == 1
        if fresh_start:
            summary.update(self.warmup())
        self.publish_weights(self.version)
        if self.cfg.eval_before and fresh_start:
            summary["accuracy_before"] = self.evaluate(iteration=0)["eval_accuracy"]
        start = time.perf_counter()
        for it in range(self.start_iter, self.algo.num_iters + 1):
            t0 = time.perf_counter()
            batch = self.collect_groups(it)
            t1 = time.perf_counter()
            self.record_success(batch)
            rewards, shaping = self.shaped_rewards(batch, it)
            train = self.train(batch, rewards, it)
            t2 = time.perf_counter()
            self.publish_weights(version=train["version"])
            t3 = time.perf_counter()
            metrics = {"iter": it, **batch_metrics(batch), **shaping, **train, "wait_seconds": t1 - t0,
                       "sync_seconds": t3 - t2, "iter_seconds": t3 - t0,
                       "tokens_per_s": train["trained_tokens"] / max(t3 - t0, 1e-9),
                       "train_tokens_per_s": train["trained_tokens"] / max(train["train_seconds"], 1e-9),
                       **self.rollout_throughput()}
            self.logger.log(metrics, step=it)
            self.log_trained_samples(it, batch)
            console.print(self.logger.iteration_line(metrics))
            if self.cfg.checkpoint.every > 0 and it % self.cfg.checkpoint.every == 0:
                self.save_state(it)
        self.drain()
        summary["rl_seconds"] = time.perf_counter() - start
        summary["trained_samples"] = self.algo.num_iters * self.algo.prompts_per_iter * self.k
        if self.cfg.eval_after:
            summary["accuracy_after"] = self.evaluate(iteration=self.algo.num_iters)["eval_accuracy"]
        summary["checkpoint"] = self.save_checkpoint()
        summary["buffer"] = ray.get(self.buffer.stats.remote())
        summary["rollout_failures"] = self.rollout_failures
        return summary

    def train(self, batch: pa.Table, rewards: list[float], it: int) -> dict:
        self.training = True
        sleep = self.rcfg.sleep_during_training and not self.overlap  # colocated: the GPU goes to the trainer
        try:
            if sleep:
                ray.get([a.sleep.remote() for a in self.rollouts])
            return self.wait_keeping_rollouts_busy(self.trainer.train_iteration.remote(batch, rewards), it)
        except (ray.exceptions.RayActorError, TrainerDied) as e:
            raise RunFailed(f"the trainer died in iteration {it}: {e}") from e
        finally:
            if sleep:
                ray.get([a.wake.remote() for a in self.rollouts])
            self.training = False

    def log_trained_samples(self, it: int, batch: pa.Table) -> None:
        with self.samples_log.open("a") as f:
            f.write(json.dumps({"iter": it, "sample_ids": batch["sample_id"].to_pylist()}) + "\n")

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

    def rollout_throughput(self) -> dict:
        """Tokens per second of one rollout actor while it generates, since the last call."""
        try:
            stats = ray.get([a.generation_stats.remote() for a in self.rollouts])
        except ray.exceptions.RayActorError:  # an actor is restarting: no number this iteration
            return {}
        tokens, seconds = sum(s["tokens"] for s in stats), sum(s["seconds"] for s in stats)
        last, self.generation_seen = self.generation_seen, (tokens, seconds)
        if tokens < last[0]:  # an actor restarted and its counters began again
            return {}
        return {"rollout_tokens": tokens - last[0],
                "rollout_tokens_per_s": (tokens - last[0]) / max(seconds - last[1], 1e-9)}

    def choose_sync_backend(self) -> str:
        """NCCL between distinct GPUs; CUDA IPC where every rollout actor shares the trainer's GPU
        (NCCL refuses two ranks on one device); gloo on CPU and for a mix of the two."""
        backend = choose_backend(self.rcfg.sync_backend, self.cfg.trainer.device, self.rcfg.device)
        if backend in ("nccl", "ipc"):
            trainer_gpu = ray.get(self.trainer.gpu.remote())
            shared = [gpu == trainer_gpu for gpu in ray.get([a.gpu.remote() for a in self.rollouts])]
            fits = all(shared) if backend == "ipc" else not any(shared)
            if not fits and self.rcfg.sync_backend == backend:
                raise ValueError(f"rollout.sync_backend={backend} does not fit where the actors are "
                                 f"({sum(shared)} of {len(shared)} rollout actors share the trainer's GPU)")
            if self.rcfg.sync_backend == "auto":
                backend = "ipc" if all(shared) else "nccl" if not any(shared) else "gloo"
        console.print(f"weight sync: {backend}")
        return backend

    def connect_weights(self) -> None:
        """A fresh broadcast group of the trainer (rank 0) and every rollout actor; also how an actor
        Ray restarted gets back in (the old group lost a member and cannot be used again)."""
        info = ray.get(self.trainer.new_weight_group.remote(self.sync_backend, 1 + len(self.rollouts)))
        bucket = self.rcfg.bucket_mb << 20
        ray.get([self.trainer.init_sync.remote(info, bucket)]
                + [a.init_sync.remote(info, i + 1, bucket) for i, a in enumerate(self.rollouts)])
        self.sync_group = info.group_id

    def publish_weights(self, version: int = 0) -> None:
        """Bucketed broadcast from the trainer into every rollout actor; the actors swap the new
        weights in between decoding steps, even in the middle of a rollout. Restarted actors (also
        those that died while idle) rejoin the broadcast group first."""
        for attempt in (1, 2):
            states = [self._sync_state(a) for a in self.rollouts]
            self.stale_actors |= {i for i, (group, _) in enumerate(states) if group != self.sync_group}
            if self.stale_actors:
                console.print(f"[yellow]rollout actor(s) {sorted(self.stale_actors)} restarted: "
                              f"rebuilding the weight broadcast group[/]")
                self.connect_weights()
            try:
                ray.get([self.trainer.publish.remote()]
                        + [a.receive_weights.remote(self.weight_meta, version) for a in self.rollouts])
                break
            except (ray.exceptions.RayActorError, RuntimeError) as e:  # a receiver died mid-broadcast
                if attempt == 2 or not self._trainer_alive():
                    raise RunFailed(f"publishing weights version {version} failed: {e}") from e
                console.print(f"[yellow]weight broadcast failed ({type(e).__name__}); retrying[/]")
                self.stale_actors = set(range(len(self.rollouts)))
        self.stale_actors.clear()
        self.version = version

    @staticmethod
    def _sync_state(actor, timeout_s: float = 300.0):
        """The actor's sync_state, waiting while Ray restarts it."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(actor.sync_state.remote())
            except ray.exceptions.ActorUnavailableError:  # restarting: its constructor takes seconds
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.ActorDiedError as e:
                raise RunFailed(f"a rollout actor died for good (more than cluster.max_actor_restarts): {e}") from e

    def _trainer_alive(self) -> bool:
        try:
            ray.get(self.trainer.pid.remote(), timeout=60)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, TrainerDied):
            return False

    # -- checkpoints --------------------------------------------------------------------------
    def save_state(self, it: int) -> Path:
        """Everything to continue after iteration `it` (k15/checkpoint.py), taken with no rollout in
        flight so that the buffer holds every segment."""
        self.drain()
        start = time.perf_counter()
        with checkpoint.writing(self.run_dir, it, self.cfg.checkpoint.keep) as tmp:
            ray.get(self.trainer.save_state.remote(str(tmp.resolve())))  # the workers' cwd is not ours
            snapshot = ray.get(self.buffer.snapshot.remote())
            checkpoint.write_buffer(tmp, snapshot)
            state = {"iteration": it, "version": self.version, "waves_launched": self.waves_launched,
                     "prompts_launched": self.prompts_launched, "buffer_counts": snapshot["counts"],
                     "sampler": self.sampler.state_dict()}
            (tmp / "controller.json").write_text(json.dumps(state))
            (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        path = checkpoint.checkpoints_dir(self.run_dir) / f"{checkpoint.PREFIX}{it:06d}"
        seconds, mb = time.perf_counter() - start, sum(f.stat().st_size for f in path.rglob("*")) / 2**20
        self.logger.log({"iter": it, "checkpoint_seconds": seconds, "checkpoint_mb": mb}, step=it)
        console.print(f"checkpoint: {path} ({mb:.1f} MiB, {seconds:.2f}s)")
        return path

    def restore(self, path: Path) -> None:
        """The state save_state wrote, into the freshly started actors."""
        state = json.loads((path / "controller.json").read_text())
        version = ray.get(self.trainer.load_state.remote(str(Path(path).resolve())))
        ray.get(self.buffer.restore.remote({**checkpoint.read_buffer(path), "counts": state["buffer_counts"]}))
        self.sampler.load_state_dict(state["sampler"])
        self.version, self.waves_launched = version, state["waves_launched"]
        self.prompts_launched = state["prompts_launched"]
        self.start_iter = state["iteration"] + 1
        rewind_jsonl(self.samples_log, state["iteration"])
        console.print(f"resumed from {path}: iteration {state['iteration']}, policy version {version}")

    def save_checkpoint(self) -> str:
        """The policy (a Hugging Face directory: `model.path=` loads it) and the sampler's state."""
        path = self.run_dir / "checkpoint"
        ray.get(self.trainer.save.remote(str(path.resolve())))
        (path / "sampler.json").write_text(json.dumps(self.sampler.state_dict()))
        return str(path)

    def evaluate(self, iteration: int) -> dict:
        self.drain()  # held-out numbers come from the current weights only
        try:
            out = evaluate(self.rollouts, self.reward_pool, self.eval_set, self.eval_tokens,
                           self.rcfg.max_response_tokens)
        except (ray.exceptions.RayActorError, NeedsWeights):  # a rollout actor died: once more, all synced
            console.print("[yellow]a rollout actor died during evaluation; evaluating again[/]")
            self.publish_weights(self.version)
            out = evaluate(self.rollouts, self.reward_pool, self.eval_set, self.eval_tokens,
                           self.rcfg.max_response_tokens)
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
            if self.cfg.deterministic:
                self.drain()  # lockstep: the next waves do not depend on which one finished first
            else:
                self._wait_one()
        if not self.overlap:
            self.drain()  # strictly alternate: no rollout runs while the trainer steps
        batch = ray.get(self.buffer.take_groups.remote(need))
        return in_draw_order(batch) if self.cfg.deterministic else batch

    def wait_keeping_rollouts_busy(self, ref, it: int):
        """Wait for `ref` (a training step) while idle rollout actors start new waves."""
        while True:
            if self.overlap:
                self.launch_waves(it)
            ready, _ = ray.wait([ref] + list(self.inflight), num_returns=1)
            if ref in ready:
                return ray.get(ref)
            self._finish(ready)

    def launch_waves(self, it: int) -> None:
        """Start a wave on every idle actor. Fresh prompts may be drawn for iterations up to
        version + 1 + max_staleness (with overlap off: only for the next iteration); unfinished
        segments are always resumed, since the groups they belong to are already counted."""
        lead = self.rcfg.max_staleness if self.overlap else 0
        busy = {wave.actor_index for wave in self.inflight.values()}
        for i in range(len(self.rollouts)):
            if i in busy or i in self.stale_actors:
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
        # "@<draw number>": a problem drawn twice gets distinct sample ids, the same in every run of a seed
        rows = [row for n, i in enumerate(picks, start=self.prompts_launched + 1)
                for row in fresh_rows([self.train_set[i]], [self.train_tokens[i]], self.k, f"@{n}")]
        self.prompts_launched += num_fresh
        table = pa.concat_tables([resume, pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA)])
        params = SamplingParams(temperature=self.rcfg.temperature, top_p=self.rcfg.top_p,
                                max_response_tokens=self.rcfg.max_response_tokens, token_budget=self.rcfg.token_budget,
                                repeat_ngram=self.rcfg.repeat_ngram, repeat_times=self.rcfg.repeat_times,
                                seed=self.cfg.seed * 1_000_003 + self.waves_launched)
        generated = self.rollouts[actor_index].rollout.remote(table, params)
        added = self.buffer.add.remote(self.reward_pool.score(generated))
        self.inflight[added] = Wave(actor_index, table, generated)
        self.waves_launched += 1
        return True

    def _wait_one(self) -> None:
        ready, _ = ray.wait(list(self.inflight), num_returns=1)
        self._finish(ready)

    def _finish(self, refs) -> None:
        for ref in refs:
            wave = self.inflight.pop(ref)
            try:
                ray.get(ref)  # surfaces an actor's error here
            except Exception as e:
                if not _failed_with_actor(wave.generated):
                    if isinstance(e, ray.exceptions.RayActorError):
                        raise RunFailed(f"the replay buffer died: {e}") from e
                    raise
                self.requeue(wave, e)

    def requeue(self, wave: Wave, error: Exception) -> None:
        """The wave's actor died (or came back without weights): its segments go back to the buffer
        for the next wave, and the actor waits for the weights before it generates again."""
        self.rollout_failures += 1
        what = "came back without weights" if isinstance(error, NeedsWeights) else "died"
        n = ray.get(self.buffer.requeue.remote(wave.table))
        console.print(f"[yellow]rollout actor {wave.actor_index} {what} during a wave; "
                      f"{n} of its {wave.table.num_rows} segments re-queued[/]")
        self.stale_actors.add(wave.actor_index)
        if not self.training:  # else the publish after the trainer step reconnects it
            self.publish_weights(self.version)

    def drain(self) -> None:
        while self.inflight:
            self._wait_one()


def in_draw_order(batch: pa.Table) -> pa.Table:
    """Groups in the order their prompts were drawn ("<problem>@<draw>"), not the order they finished."""
    draw = [int(pid.rsplit("@", 1)[1]) for pid in batch["prompt_id"].to_pylist()]
    return batch.take(np.lexsort((batch["sample_idx"].to_numpy(), draw)))


def _failed_with_actor(ref: ray.ObjectRef) -> bool:
    """Whether a rollout call failed because its actor died or was restarted."""
    try:
        ray.get(ref)
        return False
    except (ray.exceptions.RayActorError, NeedsWeights):
        return True
    except Exception:
        return False


def batch_metrics(batch: pa.Table) -> dict:
    rewards = np.array(batch["reward"].to_pylist(), dtype=float)
    lengths = np.array(batch["length"].to_pylist(), dtype=float)
    reasons = batch["finish_reason"].to_pylist()
    return {"reward": float(rewards.mean()), "accuracy": float((rewards >= 1.0).mean()),
            "mean_length": float(lengths.mean()), "p95_length": float(np.percentile(lengths, 95)),
            "repeat_fraction": reasons.count("repeat") / len(reasons),
            "truncated_fraction": reasons.count("length") / len(reasons),
            "resumed_fraction": float(np.mean(np.array(batch["num_segments"].to_pylist()) > 1))}
