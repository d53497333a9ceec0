"""The trainer as a Ray Train job: `TrainerGroup` starts a `TorchTrainer` whose workers (one per GPU,
or CPU processes) each hold a `TrainerWorker` rank, and drives them like one actor.

Ray Train places the workers (ScalingConfig), sets up their process group (NCCL on GPUs, gloo on
CPU) and watches them. The controller calls `group.train_iteration.remote(table)` as it would call
an actor and gets an ObjectRef back: the call goes through a `Mailbox` actor that every rank reads
in order, and resolves to rank 0's result once every rank has finished it (or to the first rank's
error). When the job ends (a worker died, or shutdown), every pending call fails with TrainerDied.
"""

from __future__ import annotations

import asyncio
import threading
import traceback

import ray


class TrainerDied(RuntimeError):
    """The trainer's Ray Train job ended (a worker process died, or it was shut down)."""


class TrainerCallFailed(RuntimeError):
    """A trainer method raised on some rank; the message carries that rank's traceback."""


@ray.remote(num_cpus=0)
class Mailbox:
    """Commands for the ranks, in order, and their completions."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.commands: list[tuple[str, list]] = []
        self.results: dict[int, dict] = {}
        self.futures: dict[int, asyncio.Future] = {}
        self.changed = asyncio.Condition()
        self.ended: str | None = None

    async def call(self, method: str, payload: list):
        """Queue `method` for every rank; returns rank 0's result when all have finished it."""
        if self.ended:
            raise TrainerDied(self.ended)
        seq = len(self.commands)
        self.commands.append((method, payload))
        self.futures[seq] = asyncio.get_running_loop().create_future()
        async with self.changed:
            self.changed.notify_all()
        return await self.futures[seq]

    async def next(self, seq: int):
        """Command number `seq` (a worker's next), or None once the group is ending."""
        async with self.changed:
            await self.changed.wait_for(lambda: seq < len(self.commands) or self.ended)
        return None if self.ended else self.commands[seq]

    async def done(self, rank: int, seq: int, ok: bool, value) -> None:
        results = self.results.setdefault(seq, {})
        results[rank] = (ok, value)
        future = self.futures.get(seq)
        if future is None or future.done():
            return
        failed = [(r, v) for r, (good, v) in sorted(results.items()) if not good]
        if failed:  # one rank's error is enough: the others may wait in a collective for it
            r, tb = failed[0]
            future.set_exception(TrainerCallFailed(f"trainer rank {r} failed in {self.commands[seq][0]}:\n{tb}"))
        elif len(results) == self.world:
            future.set_result(results[0][1])
            del self.results[seq]

    async def end(self, reason: str) -> None:
        self.ended = reason
        for future in self.futures.values():
            if not future.done():
                future.set_exception(TrainerDied(reason))
        async with self.changed:
            self.changed.notify_all()


def serve_worker(config: dict) -> None:
    """Ray Train's per-worker loop: build this rank's TrainerWorker, then run the mailbox's
    commands in order until the group ends. The process title names the running method
    (`ray::Trainer.train_iteration`), as for an actor, so operators and tests can find it."""
    import torch.distributed as dist
    from ray._raylet import setproctitle  # what Ray titles its actor processes with

    from k15.trainer.worker import TrainerWorker

    mailbox, rank = config["mailbox"], dist.get_rank()
    device = config["device"]
    if device == "cuda":
        from ray.train.torch import get_device

        device = str(get_device())
    worker = TrainerWorker(*config["args"], device=device, deterministic=config["deterministic"])
    seq = 0
    while (command := ray.get(mailbox.next.remote(seq))) is not None:
        method, [payload] = command
        setproctitle(f"ray::Trainer.{method}")
        try:
            args, kwargs = ray.get(payload)
            ok, value = True, getattr(worker, method)(*args, **kwargs)
        except Exception:  # reported to the caller; the worker goes on with the next command
            ok, value = False, traceback.format_exc()
        setproctitle("ray::Trainer.idle")
        ray.get(mailbox.done.remote(rank, seq, ok, value if rank == 0 or not ok else None))
        seq += 1


class _Method:
    def __init__(self, group: "TrainerGroup", name: str):
        self.group, self.name = group, name

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        return self.group.mailbox.call.remote(self.name, [ray.put((args, kwargs))])


def _absolute_paths(model_cfg):
    """A copy of model_cfg whose model and tokenizer paths do not depend on the working directory:
    Ray Train's workers run in a directory of their own."""
    import copy
    from pathlib import Path

    model_cfg = copy.deepcopy(model_cfg)
    for key in ("path", "tokenizer"):
        if model_cfg[key]:
            model_cfg[key] = str(Path(model_cfg[key]).resolve())
    return model_cfg


class TrainerGroup:
    """`num_workers` TrainerWorker ranks under Ray Train, called like an actor:
    `ray.get(group.save.remote(path))`."""

    def __init__(self, model_cfg, trainer_cfg, algo_cfg, temperature: float, seed: int, *, num_workers: int,
                 resources: dict, device: str, storage_path: str, deterministic: bool = False):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        on_gpu = str(device).startswith("cuda")
        if on_gpu and not float(resources.get("GPU", 0)):
            raise ValueError(f"trainer.device={device} needs a GPU in cluster.trainer_resources, got {dict(resources)}")
        self.mailbox = Mailbox.remote(num_workers)
        self.device = "cuda" if on_gpu else "cpu"
        model_cfg = _absolute_paths(model_cfg)
        trainer = TorchTrainer(
            serve_worker,
            train_loop_config={"mailbox": self.mailbox, "args": (model_cfg, trainer_cfg, algo_cfg, temperature, seed),
                               "device": self.device, "deterministic": deterministic},
            torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=on_gpu,
                                         resources_per_worker={k: float(v) for k, v in resources.items()}),
            # Failures end the job; the controller goes back to its last run checkpoint.
            run_config=RunConfig(storage_path=storage_path, name="trainer", failure_config=FailureConfig(max_failures=0)),
        )
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="k15-trainer-fit", daemon=True)
        self.thread.start()

    def _fit(self, trainer) -> None:
        reason = "the trainer's Ray Train job ended"
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - any end of the job fails the pending calls
            reason = f"the trainer's Ray Train job failed: {type(e).__name__}: {e}"
        try:
            ray.get(self.mailbox.end.remote(reason))
        except ray.exceptions.RayError:
            pass  # Ray itself is shutting down

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(self, name)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Let the workers leave their loop and the job finish."""
        try:
            ray.get(self.mailbox.end.remote("the trainer was shut down"))
        except ray.exceptions.RayError:
            return
        self.thread.join(timeout=timeout_s)
