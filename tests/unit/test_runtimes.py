"""The engine's runsc registration is checked before a gVisor sandbox is created.

Without ``--oci-seccomp`` gVisor ignores the sandbox's seccomp profile; with ``--host-uds=all``
the sandbox may connect to host sockets. ``RuntimeGate`` refuses runsc sandboxes then (each
query of a runsc policy fails at once with one line naming the fix) and leaves runc alone. The
real engine's registration is read in ``tests/integration/test_seccomp.py``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import SimpleNamespace
from typing import Any

import pytest

from launcher.errors import EngineTimeoutError, EngineUnavailableError
from launcher.model.policy import load_policy_text
from launcher.sandbox.backend.runtimes import RuntimeGate, refusal, runsc_flags, runsc_problem
from launcher.sandbox.capacity import Capacity
from launcher.sandbox.factory import FactorySettings, SandboxFactory
from launcher.sandbox.pool import SandboxPool
from tests.support.fakes import FakeBackend

GOOD = ["--network=none", "--host-uds=create", "--oci-seccomp"]


def registration(*args: str, path: str = "/usr/bin/runsc") -> dict[str, Any]:
    return {"runc": {"path": "runc"}, "runsc": {"path": path, "runtimeArgs": list(args)}}


def test_what_ensure_docker_registers_passes() -> None:
    assert runsc_problem(registration(*GOOD)) is None
    assert runsc_problem(registration("-oci-seccomp=true", "--host-uds", "create")) is None


@pytest.mark.parametrize(
    ("args", "missing"),
    [
        (["--network=none", "--host-uds=create"], "--oci-seccomp"),
        (["--host-uds=create", "--oci-seccomp=false"], "--oci-seccomp"),
        (["--host-uds=create", "--oci-seccomp", "--oci-seccomp=0"], "--oci-seccomp"),  # last wins
        (["--network=none", "--host-uds=all", "--oci-seccomp"], "has --host-uds=all"),
        (["--host-uds", "all", "--oci-seccomp"], "has --host-uds=all"),
        (["--host-uds=create", "--host-uds=open", "--oci-seccomp"], "has --host-uds=open"),
        (["--oci-seccomp"], "--host-uds=create"),
        ([], "--oci-seccomp"),
        # runsc stops reading flags at its first argument that is not one.
        (["--host-uds=create", "create", "--oci-seccomp"], "--oci-seccomp"),
    ],
)
def test_a_registration_that_falls_short_is_named(args: list[str], missing: str) -> None:
    problem = runsc_problem(registration(*args))
    assert problem is not None and missing in problem


def test_no_runsc_at_all() -> None:
    assert runsc_problem({"runc": {"path": "runc"}}) == "the Docker engine has no runsc runtime"
    assert runsc_problem({}) == "the Docker engine has no runsc runtime"


def test_flags_are_read_like_go_flag() -> None:
    assert runsc_flags(["-oci-seccomp=T", "--debug-log", "/x", "--host-uds=create"]) == {
        "oci-seccomp": "true",
        "debug-log": "/x",
        "host-uds": "create",
    }


def test_the_refusal_is_one_line_naming_the_fix() -> None:
    problem = runsc_problem(registration("--host-uds=all"))
    assert problem is not None
    line = refusal(problem, ["strict", "agent"])
    assert "\n" not in line
    assert line.startswith("runsc policies (agent, strict) refused: ")
    assert line.endswith("fix: sudo scripts/ensure-docker.sh")


POLICY = """
name: {name}
isolation: query
runtime: {runtime}
limits: {{cpus: 1, memory: 512MiB, pids: 128, scratch: 64MiB, statement_timeout: 5s}}
pool: {{warm: 0}}
"""
RUNC = load_policy_text(POLICY.format(name="q", runtime="runc"), "<test>")
RUNSC = load_policy_text(POLICY.format(name="strict", runtime="runsc"), "<test>")


def test_runsc_queries_fail_at_once_and_runc_ones_run(caplog: pytest.LogCaptureFixture) -> None:
    backend = FakeBackend(registered=registration("--network=none", "--host-uds=create"))

    async def main() -> None:
        gate = RuntimeGate(backend)  # registered without --oci-seccomp
        with caplog.at_level(logging.WARNING, logger="launcher.sandbox.backend.runtimes"):
            line = await gate.check_at_start(["strict"])
        assert [r.getMessage() for r in caplog.records] == [line]
        assert line is not None and "runsc policies (strict) refused" in line
        assert "--oci-seccomp" in line and "scripts/ensure-docker.sh" in line

        factory = SandboxFactory(gate, FactorySettings("img", "unit", "inst", None, 5))
        capacity = Capacity(4)
        pools = [SandboxPool(p, factory, capacity, queue_timeout_s=30) for p in (RUNC, RUNSC)]
        for pool in pools:
            pool.start()
        runc, runsc = pools
        try:
            began = time.monotonic()
            with pytest.raises(EngineUnavailableError, match="fix: sudo scripts/ensure-docker"):
                await runsc.acquire()
            assert time.monotonic() - began < 5  # not the 30 s queue timeout
            assert backend.created == 0  # nothing was created for it

            reads = backend.runtime_reads
            runc.release(await runc.acquire())
            assert backend.runtime_reads == reads  # runc never waits on the check

            # Repaired while the launcher runs: the next query gets its sandbox.
            backend.registered = registration(*GOOD)
            runsc.release(await runsc.acquire())
            assert backend.created == 2
        finally:
            for pool in pools:
                await pool.close()
        assert backend.live() == 0

    asyncio.run(main())


def test_no_runsc_policy_no_engine_call() -> None:
    backend = FakeBackend()
    assert asyncio.run(RuntimeGate(backend).check_at_start([])) is None
    assert backend.runtime_reads == 0


def test_an_engine_that_fails_the_read_at_start_does_not_stop_the_launcher() -> None:
    failing = FakeBackend(
        runtimes_error=EngineTimeoutError("Docker engine did not answer info within 30 s")
    )
    gate = RuntimeGate(failing)
    assert asyncio.run(gate.check_at_start(["strict"])) is None
    spec = SimpleNamespace(runtime="runsc")
    with pytest.raises(EngineTimeoutError):  # the sandbox itself is not created unchecked
        asyncio.run(gate.create(spec))  # type: ignore[arg-type]
