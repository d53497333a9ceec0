"""The program a sandbox container runs first: it waits for a job, then runs each test in a child.

This file is executed inside the sandbox (`python3 -I -S -c <this source>`), with only the standard
library of the sandbox's interpreter; it must not import k15. The container is started ahead of
time (pre-started): the loader announces READY and blocks on stdin, so a job only pays for a fork.

Protocol (both directions: 4-byte big-endian length, then UTF-8 JSON):
  host -> loader  {"code", "style": "stdio"|"call", "fn_name", "limits": {...}}  once, then
                  {"input": str} or {"args": list, "kwargs": dict}               per test, then
                  {"stop": true} (or end of stdin)
  loader -> host  {"status", "exit_code", "signal", "wall_s", "cpu_s", "stdout", "stdout_bytes",
                   "stderr", "result"}                                            per test
Status: "exited" (look at exit_code), "signaled", "wall_timeout", "setup_error".

The loader is PID 1 of the container's PID namespace (`bwrap --as-pid-1`), so there is no other
process holding the host pipes, and signals from inside (kill(-1), SIGKILL to pid 1) cannot reach
it. It makes itself non-dumpable so programs cannot open its pipes through /proc/1/fd.
Each test runs in a forked child in its own session with fresh rlimits (CPU seconds, address
space, processes, file size, open files, no core dumps) and its own working directory; when it is
over, the loader SIGKILLs every other process of the container (`kill(-1)`) and reaps them, so
nothing a test leaves behind survives into the next one. Expected outputs never enter the
container: the host compares.
"""

import gc
import io
import json
import os
import resource
import select
import signal
import struct
import sys
import time
import traceback
import types

STATE_DIR = "/tmp/.k15"
STDERR_TAIL = 4096


def _no_dump():
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    except Exception:
        pass


def _read_exact(fd, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(fd=0):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    body = _read_exact(fd, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body.decode("utf-8"))


def _send(obj, fd=1):
    body = json.dumps(obj, ensure_ascii=False).encode("utf-8", "replace")
    data = struct.pack(">I", len(body)) + body
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _set_limits(lim):
    def cap(kind, value):
        soft, hard = resource.getrlimit(kind)
        value = int(value)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(kind, (value, value))

    cpu = max(1, int(-(-float(lim["cpu_s"]) // 1)))  # whole seconds, rounded up
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1 if hard == resource.RLIM_INFINITY else min(cpu + 1, hard)))
    cap(resource.RLIMIT_AS, lim["memory_bytes"])
    cap(resource.RLIMIT_NPROC, lim["processes"] + 1)  # + this loader (the container's init)
    cap(resource.RLIMIT_FSIZE, lim["file_bytes"])
    cap(resource.RLIMIT_NOFILE, lim["open_files"])
    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_MSGQUEUE, 0)
    try:
        cap(resource.RLIMIT_STACK, lim.get("stack_bytes", 64 << 20))
    except (ValueError, OSError):
        pass


def _jsonable(x):
    if isinstance(x, (set, frozenset)):
        try:
            return sorted(x)
        except TypeError:
            return list(x)
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    return repr(x)


def _child(job, test, idx):
    """In the forked child: wire up the files, drop to the test's limits, run the program."""
    code = 1
    try:
        os.setsid()
        work = "/tmp/work%d" % idx
        os.mkdir(work, 0o700)
        fd = os.open(os.path.join(STATE_DIR, "in"), os.O_RDONLY)
        os.dup2(fd, 0)
        for target, name in ((1, "out"), (2, "err")):
            fd = os.open(os.path.join(STATE_DIR, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, target)
        os.closerange(3, 1 << 16)
        os.chdir(work)
        _set_limits(job["limits"])
        sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="replace")
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="backslashreplace")
        sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8", errors="backslashreplace", line_buffering=True)
        sys.argv = ["main.py"]
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        main = types.ModuleType("__main__")
        main.__file__ = "main.py"
        sys.modules["__main__"] = main
        source, style = job["code"], job["style"]
        try:
            exec(compile(source, "main.py", "exec"), main.__dict__)
            if style == "call":
                fn = _find_function(main.__dict__, test.get("fn_name"))
                result = fn(*test.get("args", []), **test.get("kwargs", {}))
                text = json.dumps(result, default=_jsonable)
                with open(os.path.join(STATE_DIR, "result"), "w", encoding="utf-8") as f:
                    f.write(text)
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code & 0xFF
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    code = code or 1
    except BaseException:
        code = 120
    finally:
        os._exit(code)


def _find_function(namespace, name):
    if not name:
        raise NameError("no fn_name given for a function-call test")
    if callable(namespace.get(name)):
        return namespace[name]
    cls = namespace.get("Solution")  # LeetCode style: class Solution with the method
    if isinstance(cls, type) and callable(getattr(cls, name, None)):
        return getattr(cls(), name)
    raise NameError("the program defines no function %r" % name)


def _wait(pid, wall_s):
    """Wait for the child up to wall_s; kill it (and everything else) when the time is up."""
    deadline = time.monotonic() + wall_s
    timed_out = False
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        try:
            ready, _, _ = select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))
            timed_out = not ready
        finally:
            os.close(pidfd)
    else:  # kernels before 5.3: poll
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.002)
    _kill_all()
    _, status, usage = os.wait4(pid, 0)
    while True:  # as PID 1 we inherit every orphan: reap them all (they were all just killed)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    return timed_out, status, usage


def _kill_all():
    """SIGKILL every other process of the container (stray daemons included); we are init, so
    kill(-1) reaches all of them and not us. A process with SIGKILL pending cannot fork."""
    for _ in range(2):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _read_file(name, limit, tail=False):
    path = os.path.join(STATE_DIR, name)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if tail and size > limit:
                f.seek(size - limit)
            return f.read(limit), size
    except OSError:
        return b"", 0


def _run_test(job, test, idx):
    lim = job["limits"]
    for name in ("out", "err", "result"):
        try:
            os.unlink(os.path.join(STATE_DIR, name))
        except FileNotFoundError:
            pass
    data = test.get("input", "")
    with open(os.path.join(STATE_DIR, "in"), "w", encoding="utf-8", errors="replace") as f:
        f.write(data if isinstance(data, str) else "")
    test = dict(test, fn_name=job.get("fn_name"))
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(job, test, idx)
    timed_out, status, usage = _wait(pid, float(lim["wall_s"]))
    wall = time.monotonic() - start
    out, out_size = _read_file("out", int(lim["output_bytes"]))
    err, _ = _read_file("err", STDERR_TAIL, tail=True)
    result, _ = _read_file("result", int(lim["output_bytes"]))
    if timed_out:
        state = "wall_timeout"
    elif os.WIFSIGNALED(status):
        state = "signaled"
    elif os.WEXITSTATUS(status) == 120:
        state = "setup_error"
    else:
        state = "exited"
    return {
        "status": state,
        "exit_code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "stdout": out.decode("utf-8", "replace"),
        "stdout_bytes": out_size,
        "stderr": err.decode("utf-8", "replace"),
        "result": result.decode("utf-8", "replace") if result else None,
    }


def main():
    if os.getpid() != 1:  # kill(-1) below must only ever reach this container's PID namespace
        sys.exit("k15 sandbox loader: refusing to run other than as PID 1 of a fresh PID namespace")
    _no_dump()
    os.makedirs(STATE_DIR, 0o700, exist_ok=True)
    _send("READY")
    job = _recv()
    if job is None:
        os._exit(0)
    cpu = job.get("cpu")
    if isinstance(cpu, int) and hasattr(os, "sched_setaffinity"):
        try:  # keep the loader and its children on one CPU: cheaper hand-offs between them
            os.sched_setaffinity(0, {cpu})
        except OSError:
            pass
    gc.freeze()  # fewer copy-on-write faults in the forked children
    idx = 0
    while True:
        test = _recv()
        if test is None or test.get("stop"):
            break
        try:
            reply = _run_test(job, test, idx)
        except Exception as e:  # the sandbox itself failed (disk full, ...): report, go on
            reply = {"status": "setup_error", "stderr": "loader: %s: %s" % (type(e).__name__, e)}
        _send(reply)
        idx += 1
    os._exit(0)  # skip interpreter teardown: the container is thrown away


if __name__ == "__main__":
    main()
