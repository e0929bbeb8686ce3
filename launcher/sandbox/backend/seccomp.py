"""The sandbox's seccomp profile: an allowlist of the system calls the runner needs.

Every sandbox gets it, under runc (the kernel filters each call) and under runsc (gVisor
applies it inside the sandbox because ``scripts/ensure-docker.sh`` registers runsc with
``--oci-seccomp``). It is written in Docker's seccomp JSON format and handed to the engine as
``security_opt=["seccomp=<json>"]``.

The allowlist is our own, written for what Python 3.11, DuckDB, pyarrow and grpcio do
(threads, epoll, eventfd, futex, mmap, getrandom, statx, rseq, ...; the integration tests run
a real multi-threaded query under it). Compared with Docker's default profile (20.10, the
engine we support, and later releases) it leaves out, with the reason next to each name in
``REMOVED``:

* what Docker allows to everyone but the runner never uses and the kernel has bled from
  (io_uring, ptrace and friends, Linux AIO, 32-bit entry points, exotic socket families and
  protocols, socket pairs of any family but AF_UNIX), or that reaches past the sandbox
  (``syncfs`` on the host's cache filesystem, ``inotify`` on inodes sandboxes share);
* everything Docker allows only to a container holding a capability (``mount``, ``bpf``,
  ``perf_event_open``, ``unshare``, ``setns``, ...). Sandboxes drop every capability, so
  those rules never applied; leaving them out entirely means a later ``cap_add`` cannot
  silently reopen them through the profile.

Anything not listed fails with EPERM (``SCMP_ACT_ERRNO``), except ``clone3``, which fails
with ENOSYS so that glibc falls back to ``clone``, whose flags the filter can inspect.

Two things exist for gVisor's sake (runsc 2022-12, the release Debian 12 ships): it resolves
names with its own syscall table, where ``pselect6`` was still called ``pselect`` (runc ignores
names it does not know, so the alias costs nothing there), and it ignores ``errnoRet``, so
``clone3`` cannot be given ENOSYS with ``SCMP_ACT_ERRNO``; see ``CLONE3_ACTION``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

# Bump when the profile changes; ``tests/unit/test_seccomp.py`` pins its digest per version.
PROFILE_VERSION = 2

EPERM = 1  # what every call outside the allowlist gets

# Every namespace flag clone(2) accepts (CLONE_NEWTIME only exists for clone3/unshare, whose
# low byte clone(2) reads as the exit signal). The same mask as Docker's default profile.
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NAMESPACE_FLAGS = (
    CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# The socket families the sandbox may open. AF_UNIX: the runner's gRPC socket. AF_INET(6):
# libraries create and probe them (grpcio checks IPv6 support); the sandbox has no network,
# so they reach only `lo`. AF_NETLINK with NETLINK_ROUTE only: glibc's getaddrinfo and
# getifaddrs ask the kernel for addresses that way. Docker blocks only AF_VSOCK; every other
# family is kernel code the runner never uses, and several (AF_VSOCK CVE-2021-26708, AF_TIPC
# CVE-2021-43267, AF_RDS CVE-2010-3904) were reachable without privileges.
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
NETLINK_ROUTE = 0

# AF_INET(6) sockets with the protocol left to the kernel (0: TCP for streams, UDP for
# datagrams) or named as TCP or UDP, nothing else. What else the families offer is more kernel
# code and no user: ICMP "ping" sockets (IPPROTO_ICMP, IPPROTO_ICMPV6; Docker opens them to
# every uid through net.ipv4.ping_group_range, which the launcher closes again), UDP-Lite,
# MPTCP, and SCTP and DCCP, whose first socket loads a kernel module on hosts that build
# them as modules.
IPPROTO_IP = 0
IPPROTO_TCP = 6
IPPROTO_UDP = 17
INET_PROTOCOLS = (IPPROTO_IP, IPPROTO_TCP, IPPROTO_UDP)

# socketpair(2) creates its sockets through the same per-family code as socket(2) and fails
# only afterwards for the families that have no pairs (AF_VSOCK, AF_NETLINK, ...: by then their
# create code ran, and their module was loaded), so it is allowed for AF_UNIX alone, the one
# family the runner pairs (Python's socket.socketpair, asyncio's self-pipe).
SOCKETPAIR_FAMILIES = (AF_UNIX,)

# personality(2): PER_LINUX, and 0xffffffff, which only reads the current persona. Docker
# also allows PER_LINUX32 and UNAME26 (32-bit emulation, a fake kernel version): no user.
PERSONALITY_VALUES = (0x0, 0xFFFFFFFF)


def _names(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# The allowlist, by what the calls are for.
_FILES = _names(
    """
    access chdir chmod chown close close_range copy_file_range creat dup dup2 dup3 faccessat
    faccessat2 fadvise64 fallocate fchdir fchmod fchmodat fchown fchownat fcntl fdatasync
    fgetxattr flistxattr flock fremovexattr fsetxattr fstat fstatfs fsync ftruncate futimesat
    getcwd getdents getdents64 getxattr ioctl lchown lgetxattr link linkat listxattr llistxattr
    lremovexattr lseek lsetxattr lstat mkdir mkdirat mknod mknodat newfstatat open openat
    openat2 pread64 preadv preadv2 pwrite64 pwritev pwritev2 read readahead readlink readlinkat
    readv removexattr rename renameat renameat2 rmdir sendfile setxattr splice stat statfs statx
    symlink symlinkat sync_file_range tee truncate umask unlink unlinkat utime utimensat utimes
    vmsplice write writev
    """
)

_MEMORY = _names(
    """
    brk madvise membarrier memfd_create mincore mlock mlock2 mlockall mmap mprotect mremap msync
    munlock munlockall munmap pkey_alloc pkey_free pkey_mprotect
    """
)

# clone is allowed below with an argument filter; clone3 fails with ENOSYS (CLONE3_ACTION).
# arch_prctl sets x86_64 thread-local storage (unknown on aarch64, so ignored there); seccomp
# can only add filters, never lift this one.
_PROCESSES = _names(
    """
    arch_prctl capget capset execve execveat exit exit_group fork futex get_robust_list getcpu
    getegid geteuid getgid getgroups getpgid getpgrp getpid getppid getpriority getresgid
    getresuid getrlimit getrusage getsid gettid getuid ioprio_get ioprio_set pidfd_open
    pidfd_send_signal prctl prlimit64 rseq sched_get_priority_max sched_get_priority_min
    sched_getaffinity sched_getattr sched_getparam sched_getscheduler sched_rr_get_interval
    sched_setaffinity sched_setattr sched_setparam sched_setscheduler sched_yield seccomp
    set_robust_list set_tid_address setfsgid setfsuid setgid setgroups setpgid setpriority
    setregid setresgid setresuid setreuid setrlimit setsid setuid vfork wait4 waitid
    """
)

_SIGNALS = _names(
    """
    kill pause restart_syscall rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo
    rt_sigreturn rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sigaltstack signalfd signalfd4
    tgkill tkill
    """
)

_TIME = _names(
    """
    alarm clock_getres clock_gettime clock_nanosleep getitimer gettimeofday nanosleep setitimer
    time timer_create timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create
    timerfd_gettime timerfd_settime times
    """
)

_EVENTS = _names(
    """
    epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait eventfd eventfd2
    pipe pipe2 poll ppoll pselect6 select
    """
)

# socket and socketpair are allowed below, for the families and protocols above only.
_SOCKETS = _names(
    """
    accept accept4 bind connect getpeername getsockname getsockopt listen recvfrom recvmmsg
    recvmsg sendmmsg sendmsg sendto setsockopt shutdown
    """
)

# System V and POSIX IPC: private to the sandbox (ipc_mode=private).
_IPC = _names(
    """
    mq_getsetattr mq_notify mq_open mq_timedreceive mq_timedsend mq_unlink msgctl msgget msgrcv
    msgsnd semctl semget semop semtimedop shmat shmctl shmdt shmget
    """
)

_SYSTEM = _names("getrandom sysinfo uname")

ALLOWED: frozenset[str] = frozenset(
    _FILES + _MEMORY + _PROCESSES + _SIGNALS + _TIME + _EVENTS + _SOCKETS + _IPC + _SYSTEM
)

# gVisor's names for allowed calls, where its syscall table (which --oci-seccomp resolves
# names with) differs from Linux's. Without "pselect", glibc's select() fails under runsc.
# (gVisor 2022-12 also lacks openat2, which it then answers with EPERM, not ENOSYS: nothing
# in the image calls it.)
GVISOR_ALIASES: Mapping[str, str] = {"pselect": "pselect6"}

# clone3 keeps its flags in memory, where seccomp cannot read them, so it must fail with
# ENOSYS: glibc (2.34+) then falls back to clone, whose flags the filter checks. EPERM would
# stop every thread from starting. SCMP_ACT_TRACE with no tracer attached means exactly
# ENOSYS, in Linux ("If there is no tracer present, ... errno set to ENOSYS", seccomp(2)) and
# in gVisor; SCMP_ACT_ERRNO with errnoRet 38 would too, but gVisor before 2023 ignores
# errnoRet and answers EPERM. No tracer can attach from inside: ptrace is not allowed.
CLONE3_ACTION = "SCMP_ACT_TRACE"

# What this profile leaves out, and why: everything Docker's default profile allows that is
# not in ALLOWED, plus calls Docker never allowed that we want named (tests check each one).
# "Docker gates it on CAP_X": Docker allows it only to a container holding that capability.
REMOVED: Mapping[str, str] = {
    # Allowed to every container by Docker's default profile (20.10, or newer releases).
    "io_uring_setup": "io_uring: a second syscall path seccomp cannot see into, and a long "
    "line of kernel CVEs; Docker 25 removed it too; no user here",
    "io_uring_enter": "io_uring (see io_uring_setup)",
    "io_uring_register": "io_uring (see io_uring_setup)",
    "ptrace": "reads and writes other processes of the sandbox; ptrace bugs are a classic "
    "escape; no debugger runs in a sandbox",
    "process_vm_readv": "ptrace-equivalent memory access to another process",
    "process_vm_writev": "ptrace-equivalent memory access to another process",
    "io_setup": "Linux AIO: nothing in Python, DuckDB, pyarrow or grpcio submits it",
    "io_submit": "Linux AIO (see io_setup)",
    "io_getevents": "Linux AIO (see io_setup)",
    "io_pgetevents": "Linux AIO (see io_setup)",
    "io_cancel": "Linux AIO (see io_setup)",
    "io_destroy": "Linux AIO (see io_setup)",
    "name_to_handle_at": "file handles, half of the 'shocker' container escape; no user",
    "fanotify_mark": "useless without fanotify_init, which needs CAP_SYS_ADMIN",
    "modify_ldt": "16/32-bit segment tables: only 32-bit code needs them, and they were "
    "behind several kernel CVEs",
    "set_thread_area": "32-bit thread-local storage (x86_64 uses arch_prctl)",
    "get_thread_area": "32-bit thread-local storage (x86_64 uses arch_prctl)",
    "remap_file_pages": "deprecated, emulated in the kernel; no user",
    "sync": "flushes every filesystem of the host, not the sandbox's: a cheap way for one "
    "sandbox to stall the host's disks (fsync/fdatasync, which flush one file, stay)",
    "syncfs": "flushes the whole filesystem a file lives on: on the read-only files mount, "
    "that is the host's cache filesystem (see sync); fsync/fdatasync stay for DuckDB's files",
    "inotify_init": "inotify watches the inode, not the mount: a sandbox watching a file "
    "linked into it sees other sandboxes open and read the same cached file (under runc), and "
    "every sandbox shares uid 65534's inotify instance and watch limits; no user",
    "inotify_init1": "inotify (see inotify_init)",
    "inotify_add_watch": "inotify (see inotify_init)",
    "inotify_rm_watch": "inotify (see inotify_init)",
    "adjtimex": "clock discipline; read-only without CAP_SYS_TIME and unused here",
    "clock_adjtime": "clock discipline (see adjtimex)",
    "epoll_ctl_old": "never implemented by Linux",
    "epoll_wait_old": "never implemented by Linux",
    "memfd_secret": "memory hidden from the kernel's own direct map; no user",
    "process_mrelease": "reaps another process's memory; no user",
    "futex_waitv": "newer than our stack; glibc and Python do not call it",
    "landlock_create_ruleset": "newer than our stack; no user",
    "landlock_add_rule": "newer than our stack; no user",
    "landlock_restrict_self": "newer than our stack; no user",
    # 32-bit and multiplexed entry points: no 32-bit code runs in the sandbox, and the
    # profile names only the engine's native architecture (no sub-architectures), so the
    # compat syscall table, historically bug-prone, is unreachable.
    "socketcall": "32-bit multiplexer (see above)",
    "ipc": "32-bit multiplexer (see above)",
    # Gated on a capability by Docker, or not in its profile at all: never present here,
    # whatever capabilities a container is given.
    "unshare": "Docker gates it on CAP_SYS_ADMIN; new user namespaces hand out a full set "
    "of capabilities over a large kernel surface (the gVisor escape of issue 16)",
    "setns": "Docker gates it on CAP_SYS_ADMIN; joins other namespaces",
    "mount": "Docker gates it on CAP_SYS_ADMIN; the filesystem layout is fixed at create",
    "umount": "Docker gates it on CAP_SYS_ADMIN (see mount)",
    "umount2": "Docker gates it on CAP_SYS_ADMIN (see mount)",
    "pivot_root": "changes the root filesystem; not in Docker's profile",
    "fsopen": "new mount API; Docker gates it on CAP_SYS_ADMIN (see mount)",
    "fsconfig": "new mount API (see fsopen)",
    "fsmount": "new mount API (see fsopen)",
    "fspick": "new mount API (see fsopen)",
    "open_tree": "new mount API (see fsopen)",
    "move_mount": "new mount API (see fsopen)",
    "mount_setattr": "new mount API (see fsopen)",
    "bpf": "Docker gates it on CAP_SYS_ADMIN/CAP_BPF; the verifier is a CVE magnet",
    "perf_event_open": "Docker gates it on CAP_SYS_ADMIN/CAP_PERFMON; side channels, CVEs",
    "userfaultfd": "not in Docker's profile; stalls kernel page faults at will, the "
    "classic tool to win use-after-free races",
    "keyctl": "not in Docker's profile; the kernel keyring is not namespaced",
    "add_key": "kernel keyring (see keyctl)",
    "request_key": "kernel keyring (see keyctl)",
    "kexec_load": "replaces the running kernel (needs CAP_SYS_BOOT)",
    "kexec_file_load": "replaces the running kernel (see kexec_load)",
    "reboot": "Docker gates it on CAP_SYS_BOOT",
    "init_module": "Docker gates it on CAP_SYS_MODULE; loads kernel code",
    "finit_module": "loads kernel code (see init_module)",
    "delete_module": "unloads kernel code (see init_module)",
    "swapon": "the host's swap (needs CAP_SYS_ADMIN)",
    "swapoff": "the host's swap (see swapon)",
    "acct": "Docker gates it on CAP_SYS_PACCT; host process accounting",
    "open_by_handle_at": "Docker gates it on CAP_DAC_READ_SEARCH; the 'shocker' escape",
    "lookup_dcookie": "Docker gates it on CAP_SYS_ADMIN; profiling interface",
    "quotactl": "Docker gates it on CAP_SYS_ADMIN; host disk quotas",
    "quotactl_fd": "host disk quotas (see quotactl)",
    "vhangup": "Docker gates it on CAP_SYS_TTY_CONFIG",
    "chroot": "Docker gates it on CAP_SYS_CHROOT",
    "syslog": "Docker gates it on CAP_SYSLOG; the host's kernel log",
    "sethostname": "Docker gates it on CAP_SYS_ADMIN",
    "setdomainname": "Docker gates it on CAP_SYS_ADMIN",
    "fanotify_init": "Docker gates it on CAP_SYS_ADMIN",
    "kcmp": "Docker gates it on CAP_SYS_PTRACE; compares other processes' kernel objects",
    "pidfd_getfd": "Docker gates it on CAP_SYS_PTRACE; steals another process's files",
    "process_madvise": "Docker gates it on CAP_SYS_PTRACE",
    "iopl": "Docker gates it on CAP_SYS_RAWIO; raw port I/O",
    "ioperm": "raw port I/O (see iopl)",
    "settimeofday": "Docker gates it on CAP_SYS_TIME; the host's clock",
    "clock_settime": "the host's clock (see settimeofday)",
    "mbind": "Docker gates it on CAP_SYS_NICE; NUMA placement",
    "get_mempolicy": "NUMA placement (see mbind)",
    "set_mempolicy": "NUMA placement (see mbind)",
}

# Docker's archMap picks the entry of the engine's own architecture (so a remote engine of
# another architecture gets its own); none has 32-bit sub-architectures (see REMOVED).
ARCHITECTURES = ("SCMP_ARCH_AARCH64", "SCMP_ARCH_X86_64")


def _rule(names: list[str], action: str = "SCMP_ACT_ALLOW", **extra: Any) -> dict[str, Any]:
    return {"names": names, "action": action, **extra}


def _arg(index: int, value: int, op: str = "SCMP_CMP_EQ", value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def build_profile() -> dict[str, Any]:
    """The profile as Docker's seccomp JSON structure.

    A rule with several arguments matches when all of them do, provided each argument
    index appears once (runc and gVisor OR conditions that share an index); alternatives
    are separate rules.
    """
    rules = [
        _rule(sorted(ALLOWED | set(GVISOR_ALIASES))),
        # Threads and fork, never new namespaces: (flags & CLONE_NEW*) == 0.
        _rule(["clone"], args=[_arg(0, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ", 0)]),
        _rule(["clone3"], CLONE3_ACTION),
        _rule(["socket"], args=[_arg(0, AF_UNIX)]),
        *(
            _rule(["socket"], args=[_arg(0, family), _arg(2, protocol)])
            for family in (AF_INET, AF_INET6)
            for protocol in INET_PROTOCOLS
        ),
        _rule(["socket"], args=[_arg(0, AF_NETLINK), _arg(2, NETLINK_ROUTE)]),
        *(_rule(["socketpair"], args=[_arg(0, family)]) for family in SOCKETPAIR_FAMILIES),
        *(_rule(["personality"], args=[_arg(0, value)]) for value in PERSONALITY_VALUES),
    ]
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": EPERM,
        "archMap": [{"architecture": arch, "subArchitectures": []} for arch in ARCHITECTURES],
        "syscalls": rules,
    }


@functools.cache
def profile_json() -> str:
    """The profile as the JSON text Docker's ``security_opt=["seccomp=..."]`` takes."""
    return json.dumps(build_profile(), sort_keys=True, separators=(",", ":"))
