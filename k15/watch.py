"""A background thread that reports, within about a second, every actor of this job that dies, is
restarted by Ray, or dies for good (the recovery itself happens where the actor's work is awaited).

It reads Ray's actor table from the GCS (`ray._private.state.actors`, no dashboard needed); if that
internal API is not there, the watch turns itself off with one log line.
"""

from __future__ import annotations

import threading

import ray

from k15.metrics import console


class ActorWatch:
    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.events: list[str] = []
        self._known: dict[str, tuple] = {}  # actor id -> (state, restarts, pid)
        self._stop = threading.Event()
        self._job = ray.get_runtime_context().get_job_id()
        self._thread = threading.Thread(target=self._loop, name="k15-actor-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            from ray._private import state
        except ImportError:
            console.print("[yellow]actor watch off: this Ray has no ray._private.state[/]")
            return
        while not self._stop.wait(self.interval_s):
            try:
                table = state.actors()
            except Exception:  # the cluster is shutting down
                return
            for actor_id, info in table.items():
                if info.get("JobID") != self._job:
                    continue
                self._compare(actor_id, info)

    def _compare(self, actor_id: str, info: dict) -> None:
        now = (info["State"], info.get("NumRestarts", 0), info.get("Pid"))
        before = self._known.get(actor_id)
        self._known[actor_id] = now
        if before is None or before == now:
            return
        name = info["ActorClassName"]
        if now[0] == "DEAD" and before[0] != "DEAD":
            cause = _error_message(info.get("DeathCause"))
            if "ray.kill" in cause:  # stopped on purpose (e.g. Ray Train ending its workers)
                return
            event = f"{name} (pid {before[2]}) died for good: {cause}"
        elif now[1] > before[1]:
            event = f"{name} (pid {before[2]}) died; Ray restarts it (restart {now[1]})"
        else:
            return
        self.events.append(event)
        console.print(f"[yellow]actor watch: {event}[/]")

    def stop(self) -> None:
        self._stop.set()


def _error_message(cause) -> str:
    """The error_message line of Ray's death-cause record (a protobuf dump), else all of it."""
    text = str(cause or "no cause reported")
    for line in text.splitlines():
        if "error_message:" in line:
            return line.split("error_message:", 1)[1].strip().strip('"')
    return text
