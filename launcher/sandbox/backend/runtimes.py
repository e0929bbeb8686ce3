"""Whether the engine runs gVisor the way duckcell's promises need, checked before each use.

Under runsc the seccomp profile (``launcher.sandbox.backend.seccomp``) holds only if the engine
registered runsc with ``--oci-seccomp``: without it gVisor ignores the container's profile, and
user namespaces, ptrace and mount are open to code in the sandbox. And ``--host-uds`` must be
``create`` (the runner makes its socket in a host directory), not ``all``, which also lets the
sandbox connect to host sockets in its mounts. Neither shows in a container's own configuration,
only in the engine's runtime registration (``docker info``: path and runtimeArgs), which
``scripts/ensure-docker.sh`` writes and repairs.

The launcher reads that registration at start when a policy runs under runsc, and logs one
line if it falls short; ``RuntimeGate`` then refuses to create a runsc sandbox unless the
registration, read again for that sandbox (one engine call, about 15 ms against a gVisor start
of about a second), holds up: a query of a runsc policy fails with that line, runc policies are
not affected, and once the engine is repaired the next query runs, without a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence

from ...errors import DuckcellError, EngineUnavailableError
from .base import (
    ContainerInfo,
    ContainerState,
    RuntimeRegistration,
    SandboxBackend,
    SandboxHandle,
    SandboxSpec,
)

log = logging.getLogger(__name__)

RUNSC = "runsc"
FIX = "fix: sudo scripts/ensure-docker.sh"

# The runsc flags duckcell depends on: the value each must have, and what goes without it.
REQUIRED_FLAGS: Mapping[str, tuple[str, str]] = {
    "oci-seccomp": ("true", "gVisor would not apply the sandbox's seccomp profile"),
    "host-uds": ("create", "only create keeps the sandbox off host sockets"),
}
_BOOLEAN_FLAGS = frozenset({"oci-seccomp"})
_TRUE = frozenset({"1", "t", "true"})  # Go's strconv.ParseBool, case-folded
_FALSE = frozenset({"0", "f", "false"})

Runtimes = Mapping[str, RuntimeRegistration]  # ``docker info``'s "Runtimes", by name


def runsc_flags(args: Sequence[str]) -> dict[str, str]:
    """runsc's global flags as Go's flag package reads them: ``-name`` or ``--name``, with
    ``=value`` or (not for booleans) the next argument as the value; the last one wins, and
    the first argument that is no flag ends them (runsc's command follows the runtime args)."""
    flags: dict[str, str] = {}
    index = 0
    while index < len(args):
        arg = str(args[index])
        if arg == "--" or not arg.startswith("-") or arg == "-":
            break
        name, has_value, value = arg.lstrip("-").partition("=")
        if not has_value:
            if name in _BOOLEAN_FLAGS:
                value = "true"
            elif index + 1 < len(args):
                index += 1
                value = str(args[index])
        if name in _BOOLEAN_FLAGS:
            folded = value.lower()
            value = "true" if folded in _TRUE else "false" if folded in _FALSE else value
        flags[name] = value
        index += 1
    return flags


def runsc_problem(runtimes: Runtimes) -> str | None:
    """What is wrong with the engine's runsc registration for duckcell, or None."""
    entry = runtimes.get(RUNSC)
    if not isinstance(entry, Mapping) or not entry.get("path"):
        return f"the Docker engine has no {RUNSC} runtime"
    flags = runsc_flags(entry.get("runtimeArgs") or [])
    wrong = []
    for name, (value, why) in REQUIRED_FLAGS.items():
        if flags.get(name) == value:
            continue
        wanted = f"--{name}" if name in _BOOLEAN_FLAGS else f"--{name}={value}"
        found = f", has --{name}={flags[name]}" if name in flags else ""
        wrong.append(f"{wanted} ({why}{found})")
    if not wrong:
        return None
    return f"the Docker engine registers {RUNSC} without {' and '.join(wrong)}"


def refusal(problem: str, policies: Collection[str] = ()) -> str:
    """The one line a refused runsc policy is reported with."""
    which = f" ({', '.join(sorted(policies))})" if policies else ""
    return f"{RUNSC} policies{which} refused: {problem}; {FIX}"


class RuntimeGate:
    """A SandboxBackend that creates a runsc sandbox only on an engine whose runsc registration
    enforces the profile (read again for each one); everything else goes straight through."""

    def __init__(self, backend: SandboxBackend):
        self._backend = backend

    async def check_at_start(self, runsc_policies: Collection[str]) -> str | None:
        """At launcher start: one warning line if ``runsc_policies`` (any) cannot run."""
        if not runsc_policies:
            return None
        try:
            problem = runsc_problem(await self._backend.runtimes())
        except DuckcellError as error:  # runc policies must not wait on it: checked per sandbox
            log.warning("could not read the engine's runtimes (%s); checked per sandbox", error)
            return None
        if problem is None:
            return None
        line = refusal(problem, runsc_policies)
        log.warning("%s", line)
        return line

    async def create(self, spec: SandboxSpec) -> SandboxHandle:
        if spec.runtime == RUNSC:
            problem = runsc_problem(await self._backend.runtimes())
            if problem is not None:
                # Fatal to the pool: waiting queries fail now, not at their queue timeout.
                raise EngineUnavailableError(refusal(problem))
        return await self._backend.create(spec)

    async def ping(self) -> None:
        await self._backend.ping()

    async def image_present(self, image: str) -> bool:
        return await self._backend.image_present(image)

    async def start(self, handle: SandboxHandle) -> None:
        await self._backend.start(handle)

    async def seal(self, handle: SandboxHandle) -> None:
        await self._backend.seal(handle)

    async def kill(self, handle: SandboxHandle) -> None:
        await self._backend.kill(handle)

    async def remove(self, handle: SandboxHandle) -> None:
        await self._backend.remove(handle)

    async def inspect(self, handle: SandboxHandle) -> ContainerState:
        return await self._backend.inspect(handle)

    async def logs(self, handle: SandboxHandle, tail: int = 20) -> str:
        return await self._backend.logs(handle, tail)

    async def list(self, labels: Mapping[str, str]) -> list[ContainerInfo]:
        return await self._backend.list(labels)

    async def remove_by_id(self, container_id: str) -> None:
        await self._backend.remove_by_id(container_id)

    async def runtimes(self) -> Runtimes:
        return await self._backend.runtimes()

    def close(self) -> None:
        self._backend.close()
