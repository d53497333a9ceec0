"""A seccomp-BPF filter for the code sandbox, compiled with libseccomp (through ctypes).

bubblewrap loads a compiled filter from a file descriptor (`bwrap --seccomp FD`) just before it
execs the sandboxed program, so all this module does is build the BPF bytes once. The filter is a
deny list on top of the namespaces: syscalls that widen the kernel's attack surface or reach across
process boundaries fail with EPERM (namespace and mount manipulation, ptrace and cross-process
memory access, kernel modules, BPF, perf, io_uring, keyrings, clock and host settings), `clone`
with any namespace flag fails, `clone3` fails with ENOSYS (glibc then falls back to `clone`, which
the filter can inspect), and sockets of any family but AF_UNIX fail: the sandbox has no network.

No Python binding is needed: Debian's python3-seccomp only serves the system interpreter, so we
talk to libseccomp.so.2 (from the libseccomp2 package, which python3-seccomp pulls in) directly.
`filter_bytes()` returns None where libseccomp is missing; the sandbox then runs without a filter
and says so in `Sandbox.features`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

# Fail with EPERM: a program that needs none of these can run unchanged; one that tries gets an error.
DENIED_SYSCALLS = (
    # mounts, namespaces, root changes
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "mount_setattr", "move_mount",
    "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    # reaching into other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "process_madvise",
    # kernel attack surface with no use in a test program
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "keyctl", "add_key", "request_key", "open_by_handle_at", "name_to_handle_at", "fanotify_init",
    "lookup_dcookie", "quotactl", "quotactl_fd", "uselib", "ustat", "sysfs", "vhangup", "personality",
    "iopl", "ioperm", "modify_ldt", "move_pages", "migrate_pages",
    # host administration
    "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "swapon", "swapoff", "acct", "syslog", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "sethostname", "setdomainname",
)

# clone(2) flags that create namespaces (linux/sched.h).
NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}
AF_UNIX = 1

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_NE = 1
_SCMP_CMP_MASKED_EQ = 7


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _load_libseccomp():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp)
    ]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _add(lib, ctx, action: int, syscall: str, *cmps: tuple[int, int, int, int]) -> bool:
    nr = lib.seccomp_syscall_resolve_name(syscall.encode())
    if nr < 0:  # not a syscall on this architecture (e.g. ioperm on aarch64)
        return False
    arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
    rc = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
    if rc < 0:
        raise OSError(-rc, f"seccomp_rule_add({syscall}) failed: {os.strerror(-rc)}")
    return True


@functools.lru_cache(maxsize=1)
def filter_bytes() -> bytes | None:
    """The compiled BPF program (bytes of struct sock_filter), or None without libseccomp."""
    lib = _load_libseccomp()
    if lib is None:
        return None
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return None
    try:
        eperm = _act_errno(errno.EPERM)
        for name in DENIED_SYSCALLS:
            _add(lib, ctx, eperm, name)
        for flag in NAMESPACE_FLAGS.values():
            _add(lib, ctx, eperm, "clone", (0, _SCMP_CMP_MASKED_EQ, flag, flag))
        _add(lib, ctx, _act_errno(errno.ENOSYS), "clone3")
        _add(lib, ctx, eperm, "socket", (0, _SCMP_CMP_NE, AF_UNIX, 0))
        fd = os.memfd_create("k15-seccomp")
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                raise OSError(-rc, f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply_to_self() -> bool:
    """Load the same filter into the calling process (and its future children), with
    no_new_privs; for helper processes that handle untrusted text outside the sandbox, such as
    the math-verify worker. Irreversible. Returns False where libseccomp is missing."""
    bpf = filter_bytes()
    if bpf is None:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    buf = ctypes.create_string_buffer(bpf, len(bpf))
    prog = _SockFprog(len(bpf) // 8, ctypes.cast(buf, ctypes.c_void_p))
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP) failed")
    return True
