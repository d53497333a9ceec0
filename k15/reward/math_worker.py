"""math-verify in a child process, with a per-call timeout that holds even in threads and Ray actors.

math-verify's own timeouts use signal.alarm, which only works in a process's main thread. So the
checks run in a worker process (`python -m k15.reward.math_worker`), in its main thread, under an
interval timer of our own; the host also keeps a deadline per answer and kills and restarts the
worker when a check cannot be interrupted (a long C-level computation in sympy). The worker caps its
own address space, so an answer like 9^{9^{9^9}} cannot take the host's memory either; once its
imports are done it also loads the sandbox's seccomp deny list (no network, namespaces, ptrace...)
and may not write to files.

Host side: `MathVerifier(timeout_s, memory_mb).verify_many([(gold, answer), ...])` returns a list
of (equal: bool, reason) with reason in correct | wrong | unparsable_answer | unparsable_gold |
timeout | error: <type>. Requests are pipelined in chunks, so 1,000 checks cost about 1,000
math-verify calls and not 1,000 process round trips.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache

# Requests in flight. The worker has read everything before a chunk is sent, so a chunk that fits
# in the pipe's buffer never blocks the write, even if the worker then hangs on its first request.
_CHUNK = 64
_CHUNK_BYTES = 60_000
_START_TIMEOUT_S = 120.0  # importing sympy on a slow, busy machine
_GRACE_S = 2.0  # host deadline beyond the worker's own timer


# ---------------------------------------------------------------------------------------------
# worker side
class _Timeout(BaseException):
    """Raised by our interval timer; a BaseException so math-verify's `except Exception` blocks
    (which would turn it into a plain False) let it through."""


def _on_alarm(signum, frame):
    raise _Timeout()


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse

    return parse(f"${gold}$", parsing_timeout=None)


def _check(gold: str, answer: str, timeout_s: float) -> tuple[bool, str]:
    from math_verify import parse, verify

    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        gold_parsed = _parse_gold(gold)
        if not gold_parsed:
            return False, "unparsable_gold"
        answer_parsed = parse(f"${answer}$", parsing_timeout=None)
        if not answer_parsed:
            return False, "unparsable_answer"
        same = bool(verify(gold_parsed, answer_parsed, timeout_seconds=None))
        return same, "correct" if same else "wrong"
    except _Timeout:
        return False, "timeout"
    except RecursionError:
        return False, "unparsable_answer"
    except Exception as e:  # math-verify on untrusted text: anything can happen
        return False, f"error: {type(e).__name__}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def worker_main(argv: list[str]) -> None:
    timeout_s, memory_mb = float(argv[0]), int(argv[1])
    import resource

    limit = memory_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGALRM, _on_alarm)
    import math_verify  # noqa: F401  (pay the import before saying ready)

    # It parses untrusted text outside the sandbox: no network, no namespaces, no ptrace from here
    # on (the sandbox's seccomp deny list), and no writing into files.
    from k15.reward.seccomp import apply_to_self

    apply_to_self()
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            same, why = _check(str(req["gold"]), str(req["answer"]), timeout_s)
        except _Timeout:
            same, why = False, "timeout"
        except MemoryError:
            same, why = False, "error: MemoryError"
        except Exception as e:
            same, why = False, f"error: {type(e).__name__}"
        out.write(json.dumps([same, why]) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------------
# host side
class MathVerifier:
    """Checks answers against gold answers in a worker process with a per-call timeout.

    Thread-safe (calls are serialized on one worker); never raises on answer content.
    """

    def __init__(self, timeout_s: float = 3.0, memory_mb: int = 2048):
        if not timeout_s > 0:
            raise ValueError(f"math 'timeout_s' must be > 0, got {timeout_s!r}")
        if not memory_mb > 0:
            raise ValueError(f"math 'memory_mb' must be > 0, got {memory_mb!r}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    # -- worker lifecycle --
    def _start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "k15.reward.math_worker", str(self.timeout_s), str(self.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0,
            env=env, start_new_session=True,
        )
        self._buf = b""
        if self._readline(time.monotonic() + _START_TIMEOUT_S) != b'"ready"':
            self._kill()
            raise RuntimeError("the math-verify worker did not start")

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
            self._proc.wait()
            for f in (self._proc.stdin, self._proc.stdout):
                f.close()
        self._proc = None

    def close(self) -> None:
        with self._lock:
            self._kill()

    def __del__(self):
        try:
            self._kill()
        except Exception:
            pass

    def _readline(self, deadline: float) -> bytes | None:
        fd = self._proc.stdout.fileno()
        poller = select.poll()  # not select(): a Ray worker can have descriptors past FD_SETSIZE
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not poller.poll(max(0, int(left * 1000))):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    # -- checks --
    def verify(self, gold: str, answer: str) -> tuple[bool, str]:
        return self.verify_many([(gold, answer)])[0]

    def verify_many(self, pairs) -> list[tuple[bool, str]]:
        pairs = [(str(g), str(a)) for g, a in pairs]
        results: list[tuple[bool, str]] = []
        with self._lock:
            i = 0
            while i < len(pairs):
                if self._proc is None:
                    self._start()
                lines = []  # at most _CHUNK requests and _CHUNK_BYTES (but at least one request)
                for g, a in pairs[i : i + _CHUNK]:
                    line = json.dumps({"gold": g, "answer": a}).encode() + b"\n"
                    if lines and sum(map(len, lines)) + len(line) > _CHUNK_BYTES:
                        break
                    lines.append(line)
                chunk, data = pairs[i : i + len(lines)], b"".join(lines)
                try:
                    self._proc.stdin.write(data)
                except (BrokenPipeError, OSError):
                    self._kill()
                    self.restarts += 1
                    results.append((False, "error: worker died"))
                    i += 1
                    continue
                for _ in chunk:
                    line = self._readline(time.monotonic() + self.timeout_s + _GRACE_S)
                    parsed = _parse_reply(line)
                    if parsed is None:  # stuck or dead: this answer failed, the rest go again
                        self.restarts += 1
                        died = self._proc.poll() is not None
                        why = "error: bad reply" if line is not None else ("error: worker died" if died else "timeout")
                        self._kill()
                        results.append((False, why))
                        i += 1
                        break
                    results.append(parsed)
                    i += 1
        return results


def _parse_reply(line: bytes | None) -> tuple[bool, str] | None:
    if line is None:
        return None
    try:
        same, why = json.loads(line)
    except (ValueError, TypeError):
        return None
    if not isinstance(same, bool) or not isinstance(why, str):
        return None
    return same, why


if __name__ == "__main__":
    worker_main(sys.argv[1:])
