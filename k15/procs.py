"""The processes of a run, found the way an operator (or the OOM killer) would: by session and by
the title Ray gives a busy actor process (`ray::Class.method`). For fault-injection tests and
benchmarks."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of every process in session `sid` (a run started in a session of its
    own: its driver and its local Ray's processes)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ProcessLookupError):
            continue
    return out


def busy_actor(sid: int, method: str) -> int | None:
    """The pid of an actor process of the session running `method` ("Class.method") right now."""
    return next((pid for pid, cmd in session_processes(sid).items() if cmd.startswith(f"ray::{method}")), None)


def kill_session(sid: int) -> None:
    """SIGKILL every process of the session: a node lost at once."""
    for pid in session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
