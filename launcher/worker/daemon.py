"""A worker, wired once: this host's sandboxes, its data path, grants, audit and the tunnel.

``duckcell worker``, the benchmarks and the tests all start a worker through ``Worker``, so the
pieces are put together in one place and shut down in one order: stop (or drain) the tunnel,
wait for it, then close the host (which cancels what still runs and destroys every sandbox),
then the worker's audit log. A worker given ``audit_file`` opens that log itself once its host
runs (the run is named by the host's instance id) and, before the tunnel exists and so before
the first query, closes as lost the queries a dead run left open (``audit.reconcile``).
``host_data_path`` opens the data path a worker of its own host reads catalog tables through
(cache, parser processes, secret store) and closes it after the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType

from ..config import LauncherConfig
from ..data.cache import ObjectCache
from ..data.datapath import DataPath
from ..data.grants import CatalogGrants
from ..data.secrets import SecretStore
from ..executor import QueryRecord
from ..host import LocalLauncher
from ..model.catalog import Catalog
from ..model.policy import PolicySet
from ..model.sql import ParserPool
from ..sandbox.backend.base import SandboxBackend
from ..sandbox.backend.docker_engine import DockerBackend
from ..sandbox.instance import instance_alive
from .audit import WorkerAuditLog
from .dialing import Backoff, ProxyConfig
from .enroll import Identity
from .queries import AuditSink, ExecutorQueryRunner
from .tunnel import DEFAULT_DRAIN_GRACE_S, TunnelClient

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def host_data_path(
    config: LauncherConfig, grants: CatalogGrants, secrets: SecretStore | None
) -> AsyncIterator[DataPath]:
    """The data path of a worker on this host: the host cache, SQL parsed in child processes
    (never in the worker itself), ``secrets`` for ``{store: NAME}`` references, and the
    operator's ``grants``. The catalog arrives from the control plane (``Worker`` hands it
    over). Closes the cache and the parser processes on exit."""
    cache = ObjectCache(config.cache_root, budget_bytes=config.cache_budget_bytes)
    parser = ParserPool()
    try:
        await parser.start()
        yield DataPath(Catalog.EMPTY, cache, parser=parser, secrets=secrets, grants=grants)
    finally:
        await cache.close()
        await parser.close()


class Worker:
    """One enrolled worker: a ``LocalLauncher`` (the host's sandboxes) running the queries a
    ``TunnelClient`` receives, through ``data`` when given (catalog tables; without it only
    queries that read no catalog table run), recorded in ``audit`` (a sink of the caller's), or
    in the ``WorkerAuditLog`` the worker opens, reconciles and closes at ``audit_file``.

    Use it as an async context manager: entering starts the host (raises what
    ``LocalLauncher.start`` raises: no engine, no image), leaving stops the tunnel and closes
    the host. ``run`` serves until ``stop`` or ``drain``; ``start``/``connected`` run the tunnel
    in a task for callers that do other work meanwhile (tests, benchmarks). Pushed catalogs go
    to ``data`` (checked against ``grants``, refusals only logged); pushed policies overlay the
    host's own unless ``accept_policies`` is False. Sandboxes run on the Docker engine the
    config names unless a ``backend`` is given (the unit tier gives an in-memory one).
    """

    def __init__(
        self,
        identity: Identity,
        config: LauncherConfig,
        *,
        data: DataPath | None = None,
        grants: CatalogGrants | None = None,
        audit: AuditSink | None = None,
        audit_file: Path | None = None,
        address: str | None = None,
        proxy: ProxyConfig | None = None,
        backoff: Backoff | None = None,
        drain_grace_s: float = DEFAULT_DRAIN_GRACE_S,
        accept_policies: bool = False,
        policies: PolicySet | None = None,
        warm_override: int | None = None,
        progress: Callable[[str], None] | None = None,
        on_finished: Callable[[QueryRecord], None] | None = None,
        backend: SandboxBackend | None = None,
    ) -> None:
        if audit is not None and audit_file is not None:
            raise ValueError("give a Worker audit or audit_file, not both")
        self.identity = identity
        self.data = data
        self._grants = grants
        if data is not None:  # sandboxes link the cache's files: the same directory
            config = dataclasses.replace(config, cache_dir=data.cache.root)
        self.host = LocalLauncher(
            config,
            backend if backend is not None else DockerBackend.for_config(config),
            policies=policies,
            warm_override=warm_override,
            progress=progress,
        )
        self._on_finished = on_finished
        self._accept_policies = accept_policies
        self._address, self._audit, self._proxy = address, audit, proxy
        self._audit_file = audit_file
        self._own_audit: WorkerAuditLog | None = None
        self._backoff, self._drain_grace_s = backoff, drain_grace_s
        self._tunnel: TunnelClient | None = None
        self._running: asyncio.Task[None] | None = None

    @property
    def tunnel(self) -> TunnelClient:
        """The tunnel client; exists once the worker is entered."""
        if self._tunnel is None:
            raise RuntimeError("the worker is not started: use `async with Worker(...)`")
        return self._tunnel

    async def __aenter__(self) -> Worker:
        await self.host.__aenter__()
        try:
            if self._audit_file is not None:
                self._own_audit = await self._open_audit(self._audit_file)
                self._audit = self._own_audit
            self._tunnel = self._new_tunnel()
        except BaseException:
            try:
                await self.host.close()
            finally:
                self._close_audit()
            raise
        return self

    async def _open_audit(self, path: Path) -> WorkerAuditLog:
        """The worker's audit log, its run named by the host's instance id. Before the first
        query, the queries a dead run left open are closed as lost (``launcher.worker.audit``)."""
        audit = WorkerAuditLog(path, run=self.host.instance_id, worker=self.identity.worker_id)
        instances = self.host.config.instances_dir
        try:
            await asyncio.to_thread(audit.reconcile, lambda run: instance_alive(instances, run))
        except BaseException:
            audit.close()
            raise
        return audit

    def _close_audit(self) -> None:
        audit, self._own_audit = self._own_audit, None
        if audit is not None:
            audit.close()

    def _new_tunnel(self) -> TunnelClient:
        # The executor exists once the host runs; the runner takes the host's policies then.
        runner = ExecutorQueryRunner(
            self.host.executor, self.host.policies, data=self.data, on_finished=self._on_finished
        )
        return TunnelClient(
            self.identity,
            address=self._address,
            backoff=self._backoff,
            runner=runner,
            audit=self._audit,
            drain_grace_s=self._drain_grace_s,
            proxy=self._proxy,
            on_catalog=self._take_catalog,
            on_policies=self.host.apply_pushed_policies if self._accept_policies else None,
        )

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._running is not None and not self._running.done():
                self.tunnel.stop()
                await self._running
        finally:
            try:
                await self.host.close()
            finally:
                self._close_audit()

    async def run(self) -> None:
        """Serve the control plane until ``stop`` or ``drain`` (then: the drain's grace)."""
        await self.tunnel.run()

    @property
    def running(self) -> asyncio.Task[None] | None:
        """The task ``start`` made (None before it): done once the tunnel has stopped."""
        return self._running

    def start(self) -> asyncio.Task[None]:
        """Run the tunnel in a task; leaving the ``async with`` block stops and awaits it."""
        self._running = asyncio.create_task(self.tunnel.run())
        return self._running

    async def connected(self, timeout_s: float) -> None:
        """Wait until the tunnel is up; raises TimeoutError after ``timeout_s``."""
        await asyncio.wait_for(self.tunnel.connected.wait(), timeout_s)

    def stop(self) -> None:
        self.tunnel.stop()

    def drain(self) -> None:
        """Take no new queries, let running ones finish (within the grace), then stop."""
        self.tunnel.drain()

    def _take_catalog(self, catalog: Catalog) -> None:
        if self.data is None:
            return
        self.data.replace_catalog(catalog)
        if self._grants is None:
            return
        try:
            for refusal in self._grants.refusals(catalog):
                log.warning("the control plane's catalog: %s", refusal)
        except Exception:  # a report only: it must never end the tunnel
            log.exception("could not check the control plane's catalog against the grants")
