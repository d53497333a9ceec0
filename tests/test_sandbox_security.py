"""Hostile programs against the code sandbox: each must be contained and score 0.

Every hostile program is scored as a candidate solution whose only passing output is proof that the
attack worked ("ESCAPED", or "ESCAPED <secret>" where the secret exists only on the host). So a
reward of 0 means the attack failed inside the sandbox; on top of that the host checks its own
state after each run (canary process alive, no files written, no connections, no leftover
processes). Control tests run the harmless attacks *outside* the sandbox, as the same unprivileged
uid, and require them to succeed: they show each detector can fire, and that the namespaces, not
file permissions, are what stops them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from k15.reward.code import parse_code_tests, run_tests, score_code
from k15.reward.sandbox import DEFAULT_UID, Limits, Sandbox, SandboxConfig, bwrap_path

pytestmark = pytest.mark.skipif(
    bwrap_path() is None, reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap"
)

LIMITS = Limits(cpu_s=1, wall_s=1.5, memory_mb=256, processes=8, file_mb=8, output_kb=256)
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
# Every hostile program first says it started (on stderr), so a broken sandbox that runs nothing
# cannot pass for one that contains everything.
PRELUDE = "import json, os, sys\nsys.stderr.write('STARTED\\n'); sys.stderr.flush()\nc = json.loads(sys.stdin.read())\n"

# name -> (program body, proof kind): "secret" expects "ESCAPED <secret>", "flag" expects "ESCAPED"
HOSTILE = {
    "net_tcp_loopback_host": ("""
import socket
s = socket.create_connection(("127.0.0.1", c["port"]), timeout=1)
print("ESCAPED", s.recv(100).decode())
""", "secret"),
    "net_unix_abstract_host": ("""
import socket
s = socket.socket(socket.AF_UNIX); s.settimeout(1)
s.connect("\\0" + c["abstract"])
print("ESCAPED", s.recv(100).decode())
""", "secret"),
    "net_unix_socket_file_host": ("""
import socket
s = socket.socket(socket.AF_UNIX); s.settimeout(1)
s.connect(c["sock"])
print("ESCAPED", s.recv(100).decode())
""", "secret"),
    "net_interfaces_beyond_loopback": ("""
names = os.listdir("/sys/class/net") if os.path.isdir("/sys/class/net") else []
import socket
names += [n for _, n in socket.if_nameindex()]
if any(n != "lo" for n in names):
    print("ESCAPED")
""", "flag"),
    "read_host_canary_file": ("""
print("ESCAPED", open(c["file"]).read().strip())
""", "secret"),
    "read_host_system_files": ("""
for p in ("/etc/shadow", "/etc/passwd", "/etc/hostname", "/root/.bashrc", "/work", "/home", c["dir"]):
    if os.path.exists(p):
        print("ESCAPED"); break
""", "flag"),
    "env_secret": ("""
found = os.environ.get(c["env"])
for pid in os.listdir("/proc"):
    try:
        for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\\0"):
            if kv.startswith(c["env"].encode() + b"="):
                found = kv.split(b"=", 1)[1].decode()
    except (OSError, ValueError):
        pass
if found:
    print("ESCAPED", found)
""", "secret"),
    "proc_snoop_host_processes": ("""
for pid in os.listdir("/proc"):
    if not pid.isdigit() or pid == str(os.getpid()):
        continue
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
    except OSError:
        continue
    if "k15canary-" in cmd:
        print("ESCAPED", cmd.split("k15canary-")[1].split("\\0")[0]); break
""", "secret"),
    "proc_host_pid_visible": ("""
if os.path.exists(f"/proc/{c['pid']}/status"):
    print("ESCAPED")
""", "flag"),
    "write_outside_sandbox": ("""
wrote = False
for p in (c["dir"] + "/pwned", "/usr/k15_pwned", "/k15_pwned", "/proc/k15_pwned", "/dev/k15_pwned"):
    try:
        with open(p, "w") as f:
            f.write("x")
        wrote = True
    except OSError:
        pass
if wrote:
    print("ESCAPED")
""", "flag"),
    "symlink_escape": ("""
import tempfile
found, d = None, tempfile.mkdtemp()
os.symlink(c["file"], d + "/l1")
os.symlink("../../../../../../../.." + c["file"], d + "/l2")
os.symlink("/proc/1/root" + c["file"], d + "/l3")
for l in (d + "/l1", d + "/l2", d + "/l3", "/proc/self/root" + c["file"], "/proc/1/cwd/" + c["file"]):
    try:
        found = open(l).read().strip()
    except OSError:
        pass
if found:
    print("ESCAPED", found)
""", "secret"),
    "setuid_root": ("""
import shutil, stat
got_root = False
for f in (os.setuid, os.seteuid, os.setgid):
    try:
        f(0); got_root = True
    except OSError:
        pass
shutil.copy("/usr/bin/python3", "/tmp/py")
try:
    os.chown("/tmp/py", 0, 0)
except OSError:
    pass
os.chmod("/tmp/py", 0o4755)
import subprocess
out = subprocess.run(["/tmp/py", "-c", "import os; print(os.geteuid())"], capture_output=True, text=True).stdout
if got_root or out.strip() == "0" or os.geteuid() == 0:
    print("ESCAPED")
""", "flag"),
    "fork_bomb": ("""
n = 0
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:  # every child forks forever
        while True:
            try:
                os.fork()
            except OSError:
                pass
    n += 1
if n >= 100:  # more processes than the limit allows: say so and leave at once
    print("ESCAPED")
sys.stdout.flush()
os._exit(0)
""", "flag"),
    "thread_bomb": ("""
import threading, time
n = 0
try:
    for _ in range(2000):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); n += 1
except RuntimeError:
    pass
if n >= 100:
    print("ESCAPED")
sys.stdout.flush(); os._exit(0)
""", "flag"),
    "memory_bomb_reserve": ("""
import mmap
try:
    m = mmap.mmap(-1, 4 << 30)  # 4 GiB of address space
    print("ESCAPED")
except (OSError, MemoryError, OverflowError):
    pass
""", "flag"),
    "memory_bomb_touch": ("""
blocks = []
for _ in range(16):
    blocks.append(bytearray(64 << 20))  # 1 GiB in all, every page written
print("ESCAPED")
""", "flag"),
    "cpu_spin": ("""
while True:
    pass
""", "flag"),
    "sleep_past_wall_limit": ("""
import time
time.sleep(3600)
print("ESCAPED")
""", "flag"),
    "huge_output": ("""
chunk = "x" * (1 << 20)
for _ in range(1000):
    sys.stdout.write(chunk)
print("ESCAPED")
""", "flag"),
    "fill_the_disk": ("""
written, i = 0, 0
chunk = b"\\0" * (1 << 20)
for d in ("/tmp", "/dev/shm", "/var/tmp", "/dev"):
    while written < (256 << 20):
        try:
            with open(f"{d}/fill{i}", "wb") as f:
                for _ in range(4):  # 4 MiB files: each under the file size limit
                    f.write(chunk)
            written += 4 << 20; i += 1
        except OSError:
            break
if written >= (128 << 20):
    print("ESCAPED")
""", "flag"),
    "one_huge_file": ("""
written = 0
try:
    with open("/tmp/big", "wb") as f:
        for _ in range(24):
            f.write(b"\\0" * (1 << 20)); f.flush(); written += 1 << 20
except OSError:
    pass
if written >= (16 << 20):
    print("ESCAPED")
""", "flag"),
    "signal_host_processes": ("""
import signal
hit = False
for sig in (0, signal.SIGKILL):
    try:
        os.kill(c["pid"], sig); hit = True
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)  # everything we may signal
except OSError:
    pass
if hit:
    print("ESCAPED")
""", "flag"),
    "ptrace_and_cross_process_memory": ("""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ok = libc.ptrace(16, 1, 0, 0) == 0  # PTRACE_ATTACH to the container's init
fd = -1
try:
    fd = os.open("/proc/1/mem", os.O_RDWR)
except OSError:
    pass
if ok or fd >= 0:
    print("ESCAPED")
""", "flag"),
    "new_user_namespace": ("""
import subprocess, ctypes
libc = ctypes.CDLL(None, use_errno=True)
ok = libc.unshare(0x10000000) == 0  # CLONE_NEWUSER
r = subprocess.run(["unshare", "-Ur", "id", "-u"], capture_output=True, text=True)
if ok or r.stdout.strip() == "0":
    print("ESCAPED")
""", "flag"),
    "mount_and_chroot": ("""
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
ok = libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0
ok |= libc.mount(b"none", b"/", None, 32 | 4096, None) == 0  # MS_REMOUNT | MS_BIND: make / writable
ok |= libc.chroot(b"/tmp") == 0
if ok:
    print("ESCAPED")
""", "flag"),
    "kernel_interfaces": ("""
hit = False
for p in ("/proc/sysrq-trigger", "/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches", "/dev/mem", "/dev/kmsg", "/sys/kernel"):
    try:
        fd = os.open(p, os.O_WRONLY); os.close(fd); hit = True  # opened for writing: never write
    except OSError:
        pass
if hit:
    print("ESCAPED")
""", "flag"),
    "tamper_with_the_loader": ("""
import json as j, struct, signal
fake = j.dumps({"status": "exited", "exit_code": 0, "stdout": "ESCAPED", "stdout_bytes": 7,
                "stderr": "", "result": None, "signal": None, "wall_s": 0, "cpu_s": 0}).encode()
for fd in ("1", "0"):  # forge a reply on the loader's channel to the host
    try:
        w = os.open(f"/proc/1/fd/{fd}", os.O_WRONLY)
        os.write(w, struct.pack(">I", len(fake)) + fake)
    except OSError:
        pass
for sig in (signal.SIGSTOP, signal.SIGKILL):  # freeze or kill the loader (PID 1)
    try:
        os.kill(1, sig)
    except OSError:
        pass
""", "flag"),
    "inherited_file_descriptors": ("""
extra = []
for f in [int(f) for f in os.listdir("/proc/self/fd")]:
    try:
        os.fstat(f)  # the directory listing's own descriptor is already closed
    except OSError:
        continue
    if f > 2:
        extra.append(f)
if extra:
    print("ESCAPED")
""", "flag"),
}

# The limit that must be what stopped them.
EXPECTED_REASON = {"memory_bomb_touch": "memory_limit", "cpu_spin": "time_limit",
                   "sleep_past_wall_limit": "time_limit", "huge_output": "output_limit"}

# Attacks that are harmless outside the sandbox: the control tests run these unconfined.
CONTROLS = ["net_tcp_loopback_host", "net_unix_abstract_host", "net_unix_socket_file_host",
            "read_host_canary_file", "env_secret", "proc_snoop_host_processes",
            "proc_host_pid_visible", "write_outside_sandbox", "symlink_escape", "signal_host_processes"]


class Host:
    """Canaries on the host: a secret file, a process, listeners, an env secret; all world-reachable
    as far as permissions go, so only the sandbox's isolation stands in the way."""

    def __init__(self):
        self.secret = secrets.token_hex(8)
        self.dir = tempfile.mkdtemp(prefix="k15canary-", dir="/tmp")
        os.chmod(self.dir, 0o777)
        self.file = os.path.join(self.dir, "secret.txt")
        with open(self.file, "w") as f:
            f.write(self.secret + "\n")
        os.chmod(self.file, 0o644)
        self.env = "K15_TEST_SECRET_" + secrets.token_hex(4).upper()
        os.environ[self.env] = self.secret
        self.connections = 0
        self._servers = []
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        self.port = tcp.getsockname()[1]
        self.abstract = "k15canary-" + secrets.token_hex(4)
        abstract = socket.socket(socket.AF_UNIX)
        abstract.bind("\0" + self.abstract)
        self.sock = os.path.join(self.dir, "sock")
        path = socket.socket(socket.AF_UNIX)
        path.bind(self.sock)
        os.chmod(self.sock, 0o777)
        for s in (tcp, abstract, path):
            s.listen(8)
            s.settimeout(0.2)
            self._servers.append(s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self.canary = self.start_canary()
        self.files_before = sorted(os.listdir(self.dir))

    def start_canary(self) -> subprocess.Popen:
        """A process of the sandbox's own host uid, with the secret in its argv and environment."""
        kw = {"user": DEFAULT_UID, "group": DEFAULT_UID, "extra_groups": []} if os.geteuid() == 0 else {}
        return subprocess.Popen(
            [PYTHON, "-c", "import time; time.sleep(600)", f"k15canary-{self.secret}"],
            env={self.env: self.secret}, stdin=subprocess.DEVNULL, **kw,
        )

    def _serve(self):
        while not self._stop.is_set():
            for s in self._servers:
                try:
                    conn, _ = s.accept()
                except (socket.timeout, OSError):
                    continue
                self.connections += 1
                conn.sendall(self.secret.encode())
                conn.close()

    def info(self) -> str:
        return json.dumps({"dir": self.dir, "file": self.file, "pid": self.canary.pid, "port": self.port,
                           "abstract": self.abstract, "sock": self.sock, "env": self.env})

    def close(self):
        self._stop.set()
        self._thread.join()
        for s in self._servers:
            s.close()
        self.canary.kill()
        self.canary.wait()
        os.environ.pop(self.env, None)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def host():
    h = Host()
    yield h
    h.close()


def _sandbox(seccomp: bool) -> Sandbox:
    return Sandbox(SandboxConfig(prestart=1, limits=LIMITS, tmpfs_mb=32, wait_exit=True, seccomp=seccomp))


@pytest.fixture(scope="module")
def sandbox():
    sb = _sandbox(seccomp=True)
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def sandbox_no_seccomp():
    sb = _sandbox(seccomp=False)
    yield sb
    sb.close()


def _expected(name: str, host: Host) -> str:
    return f"ESCAPED {host.secret}\n" if HOSTILE[name][1] == "secret" else "ESCAPED\n"


def _program(name: str) -> str:
    return PRELUDE + textwrap.dedent(HOSTILE[name][0])


def _tests_json(name: str, host: Host) -> str:
    return json.dumps({"style": "stdio", "compare": "exact", "limits": LIMITS.__dict__,
                       "tests": [{"input": host.info(), "output": _expected(name, host)}]})


def _sandbox_uid_processes() -> dict[int, int]:
    """pid -> ppid of every host process running as the sandbox uid."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            status = open(f"/proc/{pid}/status").read()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].split()[0] == "Z":  # dead, waiting for a parent to reap it
            continue
        if int(fields["Uid"].split()[0]) == DEFAULT_UID:
            out[int(pid)] = int(fields["PPid"])
    return out


def _leaked(host: Host) -> list[int]:
    """Processes of the sandbox uid that are not part of a live container.

    A container is an outer bwrap process (started by a sandbox's spawner, here or in another
    process) and the tree below it, all of the sandbox uid. A process that got out of its
    container's PID namespace would outlive it and hang off some other parent (the host's init).
    """
    procs = _sandbox_uid_processes()
    leaked = []
    for pid, ppid in procs.items():
        if pid == host.canary.pid or ppid in procs:
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue  # gone meanwhile
        if cmdline == b"":  # no address space left: exiting (a program blanking its argv reads b"\0...")
            continue
        if os.path.basename(cmdline.split(b"\0")[0]) != b"bwrap":
            leaked.append(pid)
    return sorted(leaked)


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ")[:120].decode(errors="replace")
            ppid = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]
            out.append(f"{pid} (parent {ppid}): {cmd}")
        except OSError:
            out.append(f"{pid}: gone")
    return out


def _check_contained(name: str, sb: Sandbox, host: Host) -> None:
    connections = host.connections
    start = time.monotonic()
    passed, reason, runs = run_tests(_program(name), parse_code_tests(_tests_json(name, host)), sb)
    elapsed = time.monotonic() - start
    assert not passed, f"{name} escaped: {reason}"
    assert runs and runs[0].stderr.startswith("STARTED"), f"{name} never ran: {reason} {runs}"
    if name == "tamper_with_the_loader":  # the loader survived and reported the program's exit
        assert runs[0].status == "exited" and reason == "wrong_answer", runs
    assert reason == EXPECTED_REASON.get(name, reason), runs
    assert host.canary.poll() is None, f"{name} killed a host process"
    assert host.connections == connections, f"{name} reached a host listener"
    assert sorted(os.listdir(host.dir)) == host.files_before, f"{name} wrote into a host directory"
    for path in ("/usr/k15_pwned", "/k15_pwned"):
        assert not os.path.exists(path), f"{name} wrote {path}"
    assert elapsed < LIMITS.wall_s + 4.0, f"{name} held the host for {elapsed:.1f}s"
    leaked = _leaked(host)
    assert leaked == [], f"{name} left processes behind: {_describe(leaked)}"
    # and the same program through the scoring entry point scores 0
    if name in ("memory_bomb_touch", "new_user_namespace", "read_host_canary_file"):
        response = f"```python\n{_program(name)}```"
        assert score_code(response, _tests_json(name, host), sandbox=sb).reward == 0.0


def test_benign_program_passes_in_the_same_sandbox(sandbox, host):
    """Positive control: the suite's sandbox does run programs and award correct ones."""
    spec = json.dumps({"style": "stdio", "tests": [{"input": host.info(), "output": str(host.canary.pid)}]})
    response = "```python\nimport json, sys\nprint(json.loads(sys.stdin.read())['pid'])\n```"
    assert score_code(response, spec, sandbox=sandbox).reward == 1.0


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(name, sandbox, host):
    _check_contained(name, sandbox, host)


# Without the seccomp filter the namespaces alone must still hold (defence in depth).
@pytest.mark.parametrize("name", ["net_tcp_loopback_host", "net_unix_abstract_host", "net_interfaces_beyond_loopback",
                                  "new_user_namespace", "mount_and_chroot", "ptrace_and_cross_process_memory",
                                  "symlink_escape", "signal_host_processes", "setuid_root"])
def test_hostile_program_is_contained_without_seccomp(name, sandbox_no_seccomp, host):
    _check_contained(name, sandbox_no_seccomp, host)


def test_hostile_suite_is_large_enough():
    assert len(HOSTILE) >= 20


@pytest.mark.parametrize("name", CONTROLS)
def test_attack_works_outside_the_sandbox(name, host):
    """The same program, unconfined but as the same unprivileged uid, does get the proof."""
    target = host
    if name == "signal_host_processes":  # it kills its target: give it a throwaway canary
        victim = host.start_canary()
        info = json.loads(host.info())
        info["pid"] = victim.pid
        stdin = json.dumps(info)
    else:
        victim, stdin = None, host.info()
    kw = {"user": DEFAULT_UID, "group": DEFAULT_UID, "extra_groups": []} if os.geteuid() == 0 else {}
    before = host.connections
    try:
        out = subprocess.run(
            [PYTHON, "-I", "-c", _program(name).replace("os.kill(-1, signal.SIGKILL)", "pass")],
            input=stdin, capture_output=True, text=True, timeout=20, cwd="/tmp",
            env={"PATH": "/usr/bin:/bin", host.env: host.secret}, **kw,
        )
        assert out.stdout == _expected(name, target), (out.stdout, out.stderr[-500:])
    finally:
        if victim is not None:
            victim.kill()
            victim.wait()
        for leftover in set(os.listdir(host.dir)) - set(host.files_before):
            os.unlink(os.path.join(host.dir, leftover))
        host.connections = before


def test_seccomp_filter_is_loaded(sandbox, sandbox_no_seccomp):
    """Syscalls on the deny list fail with EPERM under the filter, and not without it."""
    probe = textwrap.dedent("""
        import ctypes, socket
        libc = ctypes.CDLL(None, use_errno=True)
        out = []
        for nr in (321, 425, 298, 323):  # bpf, io_uring_setup, perf_event_open, userfaultfd (x86_64)
            libc.syscall(nr, 0, 0, 0, 0, 0); out.append(ctypes.get_errno())
        try:
            socket.socket(socket.AF_INET); out.append(0)
        except OSError as e:
            out.append(e.errno)
        print(out)
    """)
    if os.uname().machine != "x86_64":
        pytest.skip("the probe uses x86_64 syscall numbers")
    if not sandbox.features["seccomp"]:
        pytest.skip("libseccomp is not available: the sandbox runs without a filter")
    with_filter = sandbox.run(probe, [{"input": ""}]).tests[0]
    without = sandbox_no_seccomp.run(probe, [{"input": ""}]).tests[0]
    assert json.loads(with_filter.stdout) == [1, 1, 1, 1, 1], with_filter
    assert json.loads(without.stdout) != [1, 1, 1, 1, 1], without
