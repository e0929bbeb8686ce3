"""A sandbox: one hardened container with a runner, and the pure rule that specifies it.

``build_spec`` turns a policy into a SandboxSpec; it is pure so unit tests can assert every
hardening flag, and the integration tests inspect the real container for the same flags.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import StrEnum

from ..model.policy import Isolation, Policy, Runtime
from .backend.base import (
    LABEL_INSTANCE,
    LABEL_LAUNCHER,
    LABEL_POLICY,
    LABEL_QUERY,
    LABEL_SANDBOX,
    LABEL_SESSION,
    SandboxHandle,
    SandboxSpec,
)
from .files import SANDBOX_FILES, SandboxFiles
from .runner_client import RunnerClient

SANDBOX_USER = "65534:65534"  # nobody:nogroup; the image has no other user to offer
# Under gVisor the container's pids cgroup also counts the sentry's and gofer's own threads
# (28-44 at rest on 2 CPUs, varying between identical starts) and each process the query
# forks costs about 5 host pids, so the policy's number cannot be the cgroup's. The policy's
# pids become RLIMIT_NPROC, which gVisor enforces over the sandbox's own processes and
# threads exactly (a fork bomb under nproc=128 got EAGAIN at 127 children, the sandbox
# survived); the cgroup keeps a backstop sized for that many processes (128 of them peaked
# at 804 host pids). Under runc RLIMIT_NPROC would count every uid-65534 process on the host.
GVISOR_PIDS_PER_PROCESS = 8
GVISOR_PIDS_BASE = 64
TMP_BYTES = 16 * 1024 * 1024
NOFILE = 1024


class SandboxState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    DESTROYING = "destroying"


@dataclass(eq=False, slots=True)
class Sandbox:
    """A started container whose runner answered Ready; owned by one pool."""

    handle: SandboxHandle
    policy: Policy
    client: RunnerClient
    slot: str
    # With a cache: the sandbox's own directory (its /cache), where its queries' files are linked.
    files: SandboxFiles | None = None
    state: SandboxState = SandboxState.READY
    created_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.handle.name


def new_sandbox_name() -> str:
    return f"duckcell-{uuid.uuid4().hex[:12]}"


def host_pids(policy: Policy) -> int:
    """The container's pids cgroup limit for ``policy`` (see GVISOR_PIDS_PER_PROCESS)."""
    pids = policy.limits.pids
    if policy.runtime is Runtime.RUNSC:
        return pids * GVISOR_PIDS_PER_PROCESS + GVISOR_PIDS_BASE
    return pids


def build_spec(
    policy: Policy,
    *,
    name: str,
    slot: str,
    image: str,
    launcher_id: str,
    instance_id: str,
    files_dir: str | None,
    lock_to_dir: bool = False,
) -> SandboxSpec:
    """The container spec for one sandbox of ``policy``.

    Docker labels are fixed at creation, and a pooled sandbox is created before its query
    exists, so the query/session label carries the sandbox's one-use slot id; the executor
    records which query or session used that slot. ``files_dir`` is the host directory mounted
    read-only at ``/cache/files`` (``launcher.sandbox.files``); ``lock_to_dir`` (sessions) makes the
    runner lock DuckDB to that directory instead of the first query's files.
    """
    limits = policy.limits
    work_label = LABEL_SESSION if policy.isolation is Isolation.SESSION else LABEL_QUERY
    runner_config: dict[str, int | str] = {
        "memory_limit_bytes": policy.duckdb.memory_limit_bytes,
        "threads": policy.duckdb.threads,
        "max_temp_directory_bytes": policy.duckdb.max_temp_directory_bytes,
        "statement_timeout_ms": int(limits.statement_timeout_s * 1000),
    }
    if lock_to_dir:
        runner_config["session_dir"] = SANDBOX_FILES
    return SandboxSpec(
        name=name,
        image=image,
        runtime=policy.runtime.value,
        user=SANDBOX_USER,
        cpus=limits.cpus,
        memory_bytes=limits.memory_bytes,
        pids=host_pids(policy),
        nproc=limits.pids if policy.runtime is Runtime.RUNSC else None,
        scratch_bytes=limits.scratch_bytes,
        tmp_bytes=TMP_BYTES,
        nofile=NOFILE,
        files_dir=files_dir,
        labels={
            LABEL_LAUNCHER: launcher_id,
            LABEL_INSTANCE: instance_id,
            LABEL_POLICY: policy.name,
            LABEL_SANDBOX: name,
            work_label: slot,
        },
        environment={"DUCKCELL_RUNNER_CONFIG": json.dumps(runner_config, sort_keys=True)},
    )
