"""The sandbox's seccomp profile, read as data: what it allows, what it refuses, its shape.

``decide`` evaluates the profile the way runc and gVisor do for one call (a rule matches when
every argument condition holds; no rule matching means the default action), so the argument
filters on clone, socket, socketpair and personality are checked call by call. The live
behaviour, under both runtimes, is in ``tests/integration/test_seccomp.py``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from launcher.sandbox.backend import seccomp
from launcher.sandbox.backend.seccomp import (
    ALLOWED,
    CLONE_NAMESPACE_FLAGS,
    GVISOR_ALIASES,
    PROFILE_VERSION,
    REMOVED,
    build_profile,
    profile_json,
)

# The digest of each version's JSON: a change to the profile must bump PROFILE_VERSION.
PINNED = {
    1: "4f25a0b9ee1f784cc08306f616005f8b251921642372a4ffc33e92991abb6219",
    2: "fa3cb246d8f72a44ee5dc9d430c7657ce63f7e48afc31193ff5f6ac86fb00e48",
}


def _words(text: str) -> list[str]:
    return text.split()


# Issue 16's list: none of these may ever be allowed, whatever else changes.
MUST_REFUSE = _words(
    """
    io_uring_setup io_uring_enter io_uring_register userfaultfd keyctl add_key request_key
    perf_event_open bpf unshare setns mount umount2 pivot_root fsopen fsmount open_tree
    move_mount ptrace process_vm_readv process_vm_writev kexec_load kexec_file_load
    init_module finit_module delete_module reboot swapon swapoff acct name_to_handle_at
    open_by_handle_at lookup_dcookie quotactl vhangup
    """
)

# The security review's: inotify sees other sandboxes use a shared (linked) inode and shares
# uid 65534's limits; syncfs flushes the host's cache filesystem.
REVIEW_REFUSED = _words("inotify_init inotify_init1 inotify_add_watch inotify_rm_watch syncfs")

# What Python 3.11, DuckDB, pyarrow and grpcio call (threads, event loops, allocation, files).
MUST_ALLOW = _words(
    """
    futex mmap munmap mprotect mremap madvise brk rseq set_robust_list set_tid_address
    epoll_create1 epoll_ctl epoll_wait epoll_pwait eventfd2 pipe2 poll ppoll pselect6
    getrandom statx newfstatat openat close close_range read write pread64 pwrite64
    fcntl ioctl lseek getdents64 sched_getaffinity sched_yield prlimit64 getrlimit uname
    sysinfo clock_gettime clock_nanosleep nanosleep rt_sigaction rt_sigprocmask sigaltstack
    tgkill gettid getpid execve wait4 exit exit_group memfd_create membarrier faccessat2
    accept4 bind listen connect recvmsg sendmsg getsockopt setsockopt fsync fdatasync
    """
)


def _matches(condition: dict[str, Any], args: tuple[int, ...]) -> bool:
    value = args[condition["index"]]
    if condition["op"] == "SCMP_CMP_EQ":
        return value == condition["value"]
    if condition["op"] == "SCMP_CMP_MASKED_EQ":
        return value & condition["value"] == condition["valueTwo"]
    raise AssertionError(f"the test does not model {condition['op']}")


def decide(name: str, *args: int) -> str:
    """The action the profile takes for ``name(*args)``."""
    padded = (*args, *[0] * (6 - len(args)))
    profile = build_profile()
    for rule in profile["syscalls"]:
        if name in rule["names"] and all(_matches(c, padded) for c in rule.get("args", [])):
            return str(rule["action"])
    return str(profile["defaultAction"])


def test_profile_is_docker_seccomp_json() -> None:
    profile = json.loads(profile_json())
    assert profile == build_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    assert profile["defaultErrnoRet"] == 1  # EPERM
    # Native architectures only: Docker keeps the engine's own entry, no 32-bit sub-arches.
    assert {a["architecture"] for a in profile["archMap"]} == {
        "SCMP_ARCH_X86_64",
        "SCMP_ARCH_AARCH64",
    }
    assert all(a["subArchitectures"] == [] for a in profile["archMap"])
    for rule in profile["syscalls"]:
        assert set(rule) <= {"names", "action", "args"}
        assert rule["names"] and rule["action"].startswith("SCMP_ACT_")


def test_profile_version_pins_its_content() -> None:
    digest = hashlib.sha256(profile_json().encode()).hexdigest()
    assert PINNED.get(PROFILE_VERSION) == digest, (
        "the seccomp profile changed: bump PROFILE_VERSION and pin the new digest in PINNED"
    )


@pytest.mark.parametrize("name", sorted(set(MUST_REFUSE) | set(REVIEW_REFUSED) | set(REMOVED)))
def test_removed_calls_are_refused(name: str) -> None:
    assert name not in ALLOWED
    assert decide(name) == "SCMP_ACT_ERRNO"
    assert all(name not in rule["names"] for rule in build_profile()["syscalls"])


def test_every_issue_16_removal_has_a_reason() -> None:
    assert set(MUST_REFUSE) <= set(REMOVED)
    assert set(REVIEW_REFUSED) <= set(REMOVED)
    assert all(len(reason) > 10 for reason in REMOVED.values())


@pytest.mark.parametrize("name", MUST_ALLOW)
def test_what_the_runner_needs_is_allowed(name: str) -> None:
    assert decide(name) == "SCMP_ACT_ALLOW"


def test_gvisor_aliases_name_allowed_calls() -> None:
    # runsc resolves names in its own table, where pselect6 is "pselect" (glibc's select()).
    for alias, linux_name in GVISOR_ALIASES.items():
        assert linux_name in ALLOWED
        assert decide(alias) == "SCMP_ACT_ALLOW"


CLONE_THREAD_FLAGS = 0x003D0F00  # glibc's pthread_create: VM|FS|FILES|SIGHAND|THREAD|...
CLONE_FORK_FLAGS = 0x01200011  # glibc's fork: CHILD_SETTID|CHILD_CLEARTID|SIGCHLD
CLONE_VFORK_FLAGS = 0x00004111  # posix_spawn: VM|VFORK|SIGCHLD


@pytest.mark.parametrize(
    ("flags", "action"),
    [
        (CLONE_THREAD_FLAGS, "SCMP_ACT_ALLOW"),
        (CLONE_FORK_FLAGS, "SCMP_ACT_ALLOW"),
        (CLONE_VFORK_FLAGS, "SCMP_ACT_ALLOW"),
        (CLONE_FORK_FLAGS | seccomp.CLONE_NEWUSER, "SCMP_ACT_ERRNO"),
        (CLONE_FORK_FLAGS | seccomp.CLONE_NEWNS, "SCMP_ACT_ERRNO"),
        (CLONE_FORK_FLAGS | seccomp.CLONE_NEWPID, "SCMP_ACT_ERRNO"),
        (CLONE_FORK_FLAGS | seccomp.CLONE_NEWNET, "SCMP_ACT_ERRNO"),
        (CLONE_FORK_FLAGS | seccomp.CLONE_NEWIPC, "SCMP_ACT_ERRNO"),
        (CLONE_FORK_FLAGS | seccomp.CLONE_NEWUTS, "SCMP_ACT_ERRNO"),
        (CLONE_FORK_FLAGS | seccomp.CLONE_NEWCGROUP, "SCMP_ACT_ERRNO"),
        (CLONE_NAMESPACE_FLAGS, "SCMP_ACT_ERRNO"),
    ],
)
def test_clone_allows_threads_and_forks_but_no_namespace(flags: int, action: str) -> None:
    assert decide("clone", flags) == action


def test_clone_is_filtered_on_its_flags_and_clone3_answers_enosys() -> None:
    rules = [r for r in build_profile()["syscalls"] if "clone" in r["names"]]
    assert rules == [
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {
                    "index": 0,
                    "op": "SCMP_CMP_MASKED_EQ",
                    "value": CLONE_NAMESPACE_FLAGS,
                    "valueTwo": 0,
                }
            ],
        }
    ]
    assert CLONE_NAMESPACE_FLAGS == 0x7E020000  # NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|PID|NET
    # No tracer can attach (ptrace is refused), so TRACE means ENOSYS under Linux and gVisor:
    # glibc then falls back to clone, whose flags the rule above inspects.
    assert decide("clone3") == "SCMP_ACT_TRACE"
    assert "clone" not in ALLOWED and "clone3" not in ALLOWED


@pytest.mark.parametrize(
    ("family", "kind", "protocol", "action"),
    [
        (1, 1, 0, "SCMP_ACT_ALLOW"),  # AF_UNIX stream: the runner's gRPC socket
        (2, 1, 0, "SCMP_ACT_ALLOW"),  # AF_INET
        (2, 1, 6, "SCMP_ACT_ALLOW"),  # AF_INET, IPPROTO_TCP by name
        (2, 2, 17, "SCMP_ACT_ALLOW"),  # AF_INET, IPPROTO_UDP by name
        (10, 2, 0, "SCMP_ACT_ALLOW"),  # AF_INET6
        (10, 1, 6, "SCMP_ACT_ALLOW"),  # AF_INET6, IPPROTO_TCP
        (10, 2, 17, "SCMP_ACT_ALLOW"),  # AF_INET6, IPPROTO_UDP
        (2, 2, 1, "SCMP_ACT_ERRNO"),  # IPPROTO_ICMP: a ping socket
        (10, 2, 58, "SCMP_ACT_ERRNO"),  # IPPROTO_ICMPV6: a ping socket
        (2, 2, 136, "SCMP_ACT_ERRNO"),  # IPPROTO_UDPLITE
        (10, 2, 136, "SCMP_ACT_ERRNO"),  # IPPROTO_UDPLITE
        (2, 1, 262, "SCMP_ACT_ERRNO"),  # IPPROTO_MPTCP
        (2, 1, 132, "SCMP_ACT_ERRNO"),  # IPPROTO_SCTP (module autoload)
        (2, 6, 33, "SCMP_ACT_ERRNO"),  # IPPROTO_DCCP (module autoload)
        (2, 3, 255, "SCMP_ACT_ERRNO"),  # SOCK_RAW, IPPROTO_RAW
        (2, 1, 6 | 1 << 32, "SCMP_ACT_ERRNO"),  # the upper bits matter to seccomp: refused
        (16, 3, 0, "SCMP_ACT_ALLOW"),  # AF_NETLINK, NETLINK_ROUTE
        (16, 3, 12, "SCMP_ACT_ERRNO"),  # NETLINK_NETFILTER
        (16, 3, 15, "SCMP_ACT_ERRNO"),  # NETLINK_KOBJECT_UEVENT
        (17, 3, 0, "SCMP_ACT_ERRNO"),  # AF_PACKET
        (38, 5, 0, "SCMP_ACT_ERRNO"),  # AF_ALG
        (40, 1, 0, "SCMP_ACT_ERRNO"),  # AF_VSOCK
        (30, 5, 0, "SCMP_ACT_ERRNO"),  # AF_TIPC
        (21, 5, 0, "SCMP_ACT_ERRNO"),  # AF_RDS
    ],
)
def test_socket_families(family: int, kind: int, protocol: int, action: str) -> None:
    assert decide("socket", family, kind, protocol) == action


@pytest.mark.parametrize(
    ("family", "kind", "protocol", "action"),
    [
        (1, 1, 0, "SCMP_ACT_ALLOW"),  # AF_UNIX stream: Python's socket.socketpair()
        (1, 2, 0, "SCMP_ACT_ALLOW"),  # AF_UNIX datagram
        (1, 5 | 0x80000, 0, "SCMP_ACT_ALLOW"),  # AF_UNIX seqpacket, SOCK_CLOEXEC
        (40, 1, 0, "SCMP_ACT_ERRNO"),  # AF_VSOCK: created before the pair fails
        (16, 3, 16, "SCMP_ACT_ERRNO"),  # AF_NETLINK, NETLINK_GENERIC
        (16, 3, 0, "SCMP_ACT_ERRNO"),  # AF_NETLINK, NETLINK_ROUTE: no pairs either
        (2, 1, 0, "SCMP_ACT_ERRNO"),  # AF_INET
        (10, 2, 0, "SCMP_ACT_ERRNO"),  # AF_INET6
        (30, 5, 0, "SCMP_ACT_ERRNO"),  # AF_TIPC
    ],
)
def test_socketpair_is_for_unix_sockets_only(
    family: int, kind: int, protocol: int, action: str
) -> None:
    assert decide("socketpair", family, kind, protocol) == action
    assert "socketpair" not in ALLOWED  # only through the filtered rule


@pytest.mark.parametrize(
    ("persona", "action"),
    [
        (0x0, "SCMP_ACT_ALLOW"),  # PER_LINUX
        (0xFFFFFFFF, "SCMP_ACT_ALLOW"),  # query only
        (0x0008, "SCMP_ACT_ERRNO"),  # PER_LINUX32
        (0x0020000, "SCMP_ACT_ERRNO"),  # UNAME26
        (0x0040000, "SCMP_ACT_ERRNO"),  # ADDR_NO_RANDOMIZE
    ],
)
def test_personality(persona: int, action: str) -> None:
    assert decide("personality", persona) == action


def test_each_rule_names_an_argument_once() -> None:
    # runc and gVisor OR the conditions of a rule that name one argument twice, which would
    # silently widen it; alternatives must be separate rules.
    for rule in build_profile()["syscalls"]:
        indexes = [condition["index"] for condition in rule.get("args", [])]
        assert len(indexes) == len(set(indexes)), rule


def test_one_action_per_call() -> None:
    # With one action per call, the order of rules cannot matter to runc or gVisor.
    actions: dict[str, set[str]] = {}
    for rule in build_profile()["syscalls"]:
        for name in rule["names"]:
            actions.setdefault(name, set()).add(rule["action"])
    assert all(len(found) == 1 for found in actions.values())
