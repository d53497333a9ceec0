"""A code sandbox built from Linux namespaces (bubblewrap), seccomp and rlimits, with pre-started
containers so a run does not pay the start-up cost.

Isolation of one container (one candidate program, all its tests):
- `bwrap --unshare-all`: new user, PID, network (loopback only, no route out), mount, IPC, UTS and
  cgroup namespaces; `--disable-userns` so the program cannot make more user namespaces;
  `--new-session` (no TIOCSTI into a terminal); `--die-with-parent`.
- Filesystem: only /usr (and the /bin, /lib... links into it) read-only, a fresh /proc for the new
  PID namespace, a minimal /dev, a size-limited private tmpfs at /tmp; the root itself is
  remounted read-only. No /etc, /home, /root, /work: host files do not exist in there.
- No environment from the host (`--clearenv`); the interpreter runs isolated (`-I -S`).
- Runs as an unprivileged uid on the host (when the host process is root), so RLIMIT_NPROC holds
  and no file on the host is writable through uid 0.
- seccomp: the deny list of k15.reward.seccomp.
- Per test (set by the loader in the container): CPU seconds, address space, processes, file size,
  open files, no core dumps, a wall-clock limit; everything a test leaves running is killed.
The host side also keeps a deadline on every message, caps what it reads, and kills the container
(SIGKILL to bwrap; the PID namespace dies with it) when anything is off.

Pre-starting: a spawner thread keeps `prestart` containers started, each with the interpreter
loaded and blocked on its stdin; a run takes one, uses it once and throws it away. Containers are
never reused across programs, so one program cannot leave anything behind for another.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from k15.reward import seccomp as _seccomp

LOADER_SOURCE = (Path(__file__).with_name("sandbox_loader.py")).read_text()
DEFAULT_UID = 61000  # the host uid sandboxes run as when we are root; nothing else should use it
_START_TIMEOUT_S = 10.0
_SEND_TIMEOUT_S = 5.0
_SLACK_S = 1.0  # host deadline beyond the loader's wall limit for one test


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine (no bwrap, no user namespaces...); says why."""


class SandboxError(RuntimeError):
    """The sandbox machinery failed (not the program under test)."""


@dataclass(frozen=True)
class Limits:
    """Per-test resource limits. Memory is address space (RLIMIT_AS) per process, so the most one
    container can hold is about processes x memory_mb plus its tmpfs (2 GiB + 64 MiB by default);
    processes counts threads too (RLIMIT_NPROC counts tasks)."""

    cpu_s: float = 2.0
    wall_s: float = 4.0
    memory_mb: int = 512
    processes: int = 4
    file_mb: int = 16  # largest file a program may write, stdout included
    output_kb: int = 1024  # stdout (and a function's result) captured per test
    open_files: int = 256

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"sandbox limit '{f.name}' must be a positive number, got {v!r}")

    def to_wire(self) -> dict:
        return {
            "cpu_s": float(self.cpu_s),
            "wall_s": float(self.wall_s),
            "memory_bytes": int(self.memory_mb * 2**20),
            "processes": int(self.processes),
            "file_bytes": int(self.file_mb * 2**20),
            "output_bytes": int(self.output_kb * 1024),
            "open_files": int(self.open_files),
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> "Limits":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sandbox limit(s) {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class SandboxConfig:
    bwrap: str = "bwrap"
    python: str | None = None  # interpreter inside the sandbox; None: /usr/bin/python3, else ours
    uid: int = DEFAULT_UID  # host uid to run as when we are root (RLIMIT_NPROC is void for root)
    seccomp: bool = True
    prestart: int = 2  # containers kept started ahead of demand
    tmpfs_mb: int = 64  # the container's writable /tmp, shared by its tests
    wait_exit: bool = False  # run() returns only once its container is gone (else reaped behind)
    limits: Limits = field(default_factory=Limits)


@dataclass
class TestRun:
    """What happened to one test inside the sandbox (no verdict: the caller compares)."""

    __test__ = False  # not a pytest test class

    status: str  # exited | signaled | wall_timeout | setup_error | sandbox_timeout | sandbox_lost | sandbox_protocol
    exit_code: int | None = None
    signal: int | None = None
    wall_s: float = 0.0
    cpu_s: float = 0.0
    stdout: str = ""
    stdout_bytes: int = 0
    stderr: str = ""
    result: str | None = None

    _TYPES = {
        "status": (str,), "exit_code": (int, type(None)), "signal": (int, type(None)),
        "wall_s": (int, float), "cpu_s": (int, float), "stdout": (str,), "stdout_bytes": (int,),
        "stderr": (str,), "result": (str, type(None)),
    }

    @classmethod
    def from_wire(cls, msg) -> "TestRun":
        """Parse a loader reply defensively: anything malformed becomes status sandbox_protocol."""
        if not isinstance(msg, dict) or not isinstance(msg.get("status"), str):
            return cls("sandbox_protocol", stderr=f"bad reply: {str(msg)[:200]}")
        kwargs = {}
        for name, types in cls._TYPES.items():
            if name in msg:
                value = msg[name]
                if isinstance(value, bool) or not isinstance(value, types):
                    return cls("sandbox_protocol", stderr=f"bad field {name!r} in reply")
                kwargs[name] = value
        return cls(**kwargs)


@dataclass
class SandboxRun:
    tests: list[TestRun]
    seconds: float  # from taking a container to its exit


def bwrap_path(bwrap: str = "bwrap") -> str | None:
    return shutil.which(bwrap)


def _default_python() -> tuple[str, list[str]]:
    """The interpreter to run inside, and extra host directories it needs (read-only)."""
    if os.path.exists("/usr/bin/python3"):
        return "/usr/bin/python3", []
    exe = os.path.realpath(sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    return exe, ([] if prefix.startswith("/usr") else [prefix])


class _Timeout(Exception):
    pass


class _Closed(Exception):
    pass


class _Container:
    """One started bwrap process and the framed channel to its loader."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._buf = bytearray()
        os.set_blocking(proc.stdin.fileno(), False)  # a stalled reader must not block a write

    @staticmethod
    def _wait_fd(fd: int, events: int, timeout_s: float) -> bool:
        """poll(), not select(): a Ray worker can have descriptors past FD_SETSIZE."""
        p = select.poll()
        p.register(fd, events)
        return bool(p.poll(max(0, int(timeout_s * 1000))))

    def send(self, obj, deadline: float) -> None:
        body = json.dumps(obj).encode("utf-8", "surrogatepass")
        data = memoryview(struct.pack(">I", len(body)) + body)
        fd = self.proc.stdin.fileno()
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout("sending to the sandbox")
            if not self._wait_fd(fd, select.POLLOUT, left):
                continue
            try:
                n = os.write(fd, data[: 1 << 16])
            except BlockingIOError:
                continue
            except OSError as e:  # EPIPE: the container is gone
                raise _Closed(str(e)) from None
            data = data[n:]

    def recv(self, deadline: float, max_bytes: int):
        while True:
            if len(self._buf) >= 4:
                n = struct.unpack(">I", self._buf[:4])[0]
                if n > max_bytes:
                    raise ValueError(f"sandbox reply of {n} bytes exceeds {max_bytes}")
                if len(self._buf) >= 4 + n:
                    body = bytes(self._buf[4 : 4 + n])
                    del self._buf[: 4 + n]
                    try:
                        return json.loads(body.decode("utf-8", "replace"))
                    except RecursionError:  # absurdly nested JSON
                        raise ValueError("sandbox reply nested too deeply") from None
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout("waiting for the sandbox")
            fd = self.proc.stdout.fileno()
            if not self._wait_fd(fd, select.POLLIN, left):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _Closed("the sandbox closed its output")
            self._buf += chunk

    def stderr_tail(self, limit: int = 2000) -> str:
        fd = self.proc.stderr.fileno()
        out = b""
        while len(out) < 1 << 16 and self._wait_fd(fd, select.POLLIN, 0):
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            out += chunk
        return out[-limit:].decode("utf-8", "replace")

    def kill(self) -> None:
        """Kill the container: SIGKILL its init (the loader) first, so that by the time bwrap has
        exited the kernel has torn the whole PID namespace down; then bwrap itself if need be."""
        if self.proc.poll() is None:
            pid = self.proc.pid
            try:
                with open(f"/proc/{pid}/task/{pid}/children") as f:
                    inits = [int(x) for x in f.read().split()]
            except (OSError, ValueError):
                inits = []
            for child in inits:
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(timeout=5.0 if inits else 0)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.poll() is None:
                try:
                    self.proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass

    def finish(self, timeout: float) -> None:
        """Let the loader exit after a stop message; kill the container if it does not."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self.kill()


class Sandbox:
    """Runs untrusted Python programs against tests in pre-started bubblewrap containers.

    `run(code, tests, style="stdio"|"call", fn_name=..., limits=..., judge=...)` is thread-safe;
    each call uses its own container. `close()` (or interpreter exit) kills the warm ones; every
    container also dies with this process (--die-with-parent).
    """

    def __init__(self, config: SandboxConfig | None = None, **overrides):
        config = dataclasses.replace(config or SandboxConfig(), **overrides)
        if not isinstance(config.limits, Limits):
            config = dataclasses.replace(config, limits=Limits.from_dict(config.limits))
        if config.prestart < 0:
            raise ValueError(f"sandbox 'prestart' must be >= 0, got {config.prestart}")
        self.config = config
        bwrap = bwrap_path(config.bwrap)
        if bwrap is None:
            raise SandboxUnavailable(
                f"bubblewrap ('{config.bwrap}') is not installed: apt-get install bubblewrap"
            )
        if config.python:
            python, extra = config.python, []
        else:
            python, extra = _default_python()
        bpf = _seccomp.filter_bytes() if config.seccomp else None
        self._bpf = bpf
        self._argv_head, self._argv_tail = _bwrap_argv(bwrap, python, extra, config.tmpfs_mb)
        self._popen_kwargs = {}
        if os.geteuid() == 0:
            self._popen_kwargs = {"user": config.uid, "group": config.uid, "extra_groups": []}
        self.features = {
            "bwrap": bwrap,
            "python": python,
            "seccomp": bpf is not None,
            "host_uid": config.uid if os.geteuid() == 0 else os.geteuid(),
            "prestart": config.prestart,
        }
        self._cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        self._cpu_load = collections.Counter()
        self._reap_queue: collections.deque[_Container] = collections.deque()
        self._cond = threading.Condition()
        self._warm: collections.deque[_Container] = collections.deque()
        self._waiting = 0
        self._closed = False
        self._spawn_error: BaseException | None = None
        # Containers are spawned from one long-lived thread only: --die-with-parent ties each to the
        # thread that forked it, so a short-lived caller thread would take its container down.
        self._thread = threading.Thread(target=self._spawner, name="k15-sandbox-spawner", daemon=True)
        self._thread.start()
        self._reaper_thread = threading.Thread(target=self._reaper, name="k15-sandbox-reaper", daemon=True)
        self._reaper_thread.start()
        self._finalizer = weakref.finalize(
            self, Sandbox._shutdown, self._cond, self._warm, self._reap_queue, self._thread
        )

    # -- pool ---------------------------------------------------------------------------------
    def _spawn(self) -> _Container:
        pass_fds, argv = (), self._argv_head + self._argv_tail
        r = -1
        if self._bpf is not None:
            r, w = os.pipe()
            os.write(w, self._bpf)
            os.close(w)
            pass_fds = (r,)
            argv = self._argv_head + ["--seccomp", str(r)] + self._argv_tail
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                bufsize=0, cwd="/", env={"PATH": "/usr/bin:/bin"}, close_fds=True,
                pass_fds=pass_fds, start_new_session=True, **self._popen_kwargs,
            )
        finally:
            if r >= 0:
                os.close(r)
        return _Container(proc)

    def _reaper(self) -> None:
        """Containers told to stop exit by themselves; wait for them, kill any that lingers."""
        while True:
            with self._cond:
                while not self._closed and not self._reap_queue:
                    self._cond.wait()
                if self._closed:
                    return
                c = self._reap_queue.popleft()
            c.finish(timeout=1.0)

    def _spawner(self) -> None:
        while True:
            with self._cond:
                while not self._closed and len(self._warm) >= self.config.prestart + self._waiting:
                    self._cond.wait()
                if self._closed:
                    return
            try:
                c = self._spawn()
            except BaseException as e:  # bwrap missing at run time, fork failure, ...
                with self._cond:
                    self._spawn_error = e
                    self._cond.notify_all()
                    self._cond.wait(0.5)  # do not spin on a broken host
                continue
            with self._cond:
                if self._closed:
                    c.kill()
                    return
                self._spawn_error = None
                self._warm.append(c)
                self._cond.notify_all()

    def _take(self) -> _Container:
        for attempt in range(3):
            with self._cond:
                self._waiting += 1
                self._cond.notify_all()
                try:
                    deadline = time.monotonic() + _START_TIMEOUT_S
                    while not self._warm:
                        if self._closed:
                            raise SandboxError("the sandbox is closed")
                        if self._spawn_error is not None:
                            raise SandboxError(f"cannot start a sandbox: {self._spawn_error}")
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise SandboxError("no sandbox started within the start timeout")
                        self._cond.wait(left)
                    c = self._warm.popleft()
                finally:
                    self._waiting -= 1
                    self._cond.notify_all()
            try:
                if c.recv(time.monotonic() + _START_TIMEOUT_S, 1024) == "READY":
                    return c
                why = "unexpected greeting"
            except (_Timeout, _Closed, ValueError) as e:
                why = str(e)
            err = c.stderr_tail()
            c.kill()
            if attempt == 2:
                raise SandboxError(f"the sandbox did not start ({why}): {err.strip()}")
        raise AssertionError("unreachable")

    # -- running --------------------------------------------------------------------------------
    def run(self, code: str, tests: list[dict], style: str = "stdio", fn_name: str | None = None,
            limits: Limits | None = None, judge=None, wait_exit: bool | None = None) -> SandboxRun:
        """Run `code` on each test in one fresh container.

        tests: [{"input": str}] for style "stdio"; [{"args": [...], "kwargs": {...}}] for "call".
        judge(index, TestRun) -> bool: return False to stop after that test (all-or-nothing scoring
        stops at the first failure). wait_exit: return only once the container has exited (None:
        config.wait_exit; else the reaper thread collects it). Raises SandboxError only when the
        machinery fails.
        """
        if style not in ("stdio", "call"):
            raise ValueError(f"sandbox 'style' must be 'stdio' or 'call', got {style!r}")
        if style == "call" and not fn_name:
            raise ValueError("sandbox 'fn_name' is required for style 'call'")
        limits = limits or self.config.limits
        wait_exit = self.config.wait_exit if wait_exit is None else wait_exit
        if not isinstance(code, str):
            raise TypeError(f"sandbox 'code' must be a str, got {type(code).__name__}")
        wire = limits.to_wire()
        max_reply = 8 * (2 * wire["output_bytes"] + 8192) + (1 << 16)
        t0 = time.perf_counter()
        c = self._take()
        cpu = self._pick_cpu()
        results: list[TestRun] = []
        stopped = False
        try:
            c.send({"code": code, "style": style, "fn_name": fn_name, "limits": wire, "cpu": cpu},
                   time.monotonic() + _SEND_TIMEOUT_S)
            for i, test in enumerate(tests):
                if style == "stdio":
                    msg = {"input": test.get("input", "")}
                else:
                    msg = {"args": list(test.get("args", [])), "kwargs": dict(test.get("kwargs", {}))}
                c.send(msg, time.monotonic() + _SEND_TIMEOUT_S)
                try:
                    reply = c.recv(time.monotonic() + limits.wall_s + _SLACK_S, max_reply)
                except ValueError as e:
                    results.append(TestRun("sandbox_protocol", stderr=str(e)[:500]))
                    break
                tr = TestRun.from_wire(reply)
                results.append(tr)
                if tr.status == "sandbox_protocol" or (judge is not None and not judge(i, tr)):
                    break
            c.send({"stop": True}, time.monotonic() + 0.5)
            stopped = True
        except _Timeout as e:
            results.append(TestRun("sandbox_timeout", stderr=str(e)))
        except _Closed as e:
            results.append(TestRun("sandbox_lost", stderr=f"{e}; {c.stderr_tail()}"))
        finally:
            self._release_cpu(cpu)
            if stopped and not wait_exit:
                with self._cond:  # it exits by itself; the reaper thread collects it
                    self._reap_queue.append(c)
                    self._cond.notify_all()
            elif stopped:
                c.finish(timeout=1.0)
            else:
                c.kill()
        return SandboxRun(results, time.perf_counter() - t0)

    def _pick_cpu(self) -> int | None:
        if not self._cpus:
            return None
        with self._cond:
            cpu = min(self._cpus, key=lambda k: self._cpu_load[k])
            self._cpu_load[cpu] += 1
            return cpu

    def _release_cpu(self, cpu: int | None) -> None:
        if cpu is not None:
            with self._cond:
                self._cpu_load[cpu] -= 1

    def selftest(self) -> None:
        """Raise SandboxUnavailable unless a trivial program runs correctly."""
        try:
            out = self.run("print(input()[::-1])", [{"input": "k15"}]).tests
        except SandboxError as e:
            raise SandboxUnavailable(str(e)) from None
        if not out or out[0].status != "exited" or out[0].stdout != "51k\n":
            raise SandboxUnavailable(f"sandbox self-test failed: {out}")

    # -- shutdown -------------------------------------------------------------------------------
    @staticmethod
    def _shutdown(cond, warm, reap, thread) -> None:
        with cond:
            containers = list(warm) + list(reap)
            warm.clear()
            reap.clear()
        for c in containers:
            c.kill()

    def close(self) -> None:
        """Kill the warm containers, then stop the threads. In that order: when the spawner thread
        ends, the kernel SIGKILLs the bwrap processes it started (--die-with-parent) before they
        can reap their containers, which would leave those to the host's init."""
        with self._cond:
            self._closed = True
        self._finalizer()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(timeout=5)
        self._reaper_thread.join(timeout=5)

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bwrap_argv(bwrap: str, python: str, extra_ro: list[str], tmpfs_mb: int) -> tuple[list[str], list[str]]:
    """bwrap options before `--seccomp FD` and the command after it."""
    head = [
        bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
        "--as-pid-1",  # no bwrap init inside holding our pipes: the loader is init
        "--uid", "1000", "--gid", "1000", "--hostname", "sandbox",
        "--ro-bind", "/usr", "/usr",
    ]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            head += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            head += ["--ro-bind", top, top]
    for path in extra_ro:
        head += ["--ro-bind", path, path]
    head += [
        "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",  # its tmpfs has no size limit
        "--size", str(int(tmpfs_mb * 2**20)), "--tmpfs", "/tmp",
        "--remount-ro", "/",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8", "--chdir", "/tmp",
    ]
    tail = [python, "-I", "-S", "-B", "-c", LOADER_SOURCE]
    return head, tail
