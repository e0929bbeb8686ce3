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
from .policy import Isolation, Policy
from .runner_client import RunnerClient
from .session_files import SessionDir

SANDBOX_USER = "65534:65534"  # nobody:nogroup; the image has no other user to offer
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
    # A session policy's sandbox with a cache: the directory its queries' files are linked into.
    session_dir: SessionDir | None = None
    state: SandboxState = SandboxState.READY
    created_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.handle.name


def new_sandbox_name() -> str:
    return f"duckcell-{uuid.uuid4().hex[:12]}"


def build_spec(
    policy: Policy,
    *,
    name: str,
    slot: str,
    image: str,
    launcher_id: str,
    instance_id: str,
    cache_dir: str | None,
    session_dir: str | None = None,
) -> SandboxSpec:
    """The container spec for one sandbox of ``policy``.

    Docker labels are fixed at creation, and a pooled sandbox is created before its query
    exists, so the query/session label carries the sandbox's one-use slot id; the executor
    records which query or session used that slot. ``session_dir`` (as the sandbox sees it)
    makes the runner lock to that directory instead of the first query's files (see
    ``launcher.session_files``).
    """
    limits = policy.limits
    work_label = LABEL_SESSION if policy.isolation is Isolation.SESSION else LABEL_QUERY
    runner_config: dict[str, int | str] = {
        "memory_limit_bytes": policy.duckdb.memory_limit_bytes,
        "threads": policy.duckdb.threads,
        "max_temp_directory_bytes": policy.duckdb.max_temp_directory_bytes,
        "statement_timeout_ms": int(limits.statement_timeout_s * 1000),
    }
    if session_dir:
        runner_config["session_dir"] = session_dir
    return SandboxSpec(
        name=name,
        image=image,
        runtime=policy.runtime.value,
        user=SANDBOX_USER,
        cpus=limits.cpus,
        memory_bytes=limits.memory_bytes,
        pids=limits.pids,
        scratch_bytes=limits.scratch_bytes,
        tmp_bytes=TMP_BYTES,
        nofile=NOFILE,
        cache_dir=cache_dir,
        labels={
            LABEL_LAUNCHER: launcher_id,
            LABEL_INSTANCE: instance_id,
            LABEL_POLICY: policy.name,
            LABEL_SANDBOX: name,
            work_label: slot,
        },
        environment={"DUCKCELL_RUNNER_CONFIG": json.dumps(runner_config, sort_keys=True)},
    )
