"""The launcher on one host, wired: config -> engine -> orphan reaping -> pools -> executor.

Used by the CLI's embedded mode, the tests and the benchmark; the tunnel worker wraps the
same object. Shutdown is ordered: stop taking queries, end sessions, close pools (which
destroys every sandbox), release the instance lock. Policies can be replaced while it runs
(``replace_policies``): see ``launcher.sandbox.pools`` for what happens to the pools.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from types import TracebackType

from .config import LauncherConfig
from .data.datapath import TableFiles
from .errors import ImageMissingError
from .executor import Executor, QueryExecution, TablePreparer
from .model.policy import Policy, PolicySet, check_no_downgrade, load_policies
from .sandbox.backend.docker_engine import DockerBackend
from .sandbox.backend.paths import EnginePaths
from .sandbox.backend.runtimes import RUNSC, RuntimeGate, docker_runtimes
from .sandbox.capacity import Capacity
from .sandbox.factory import FactorySettings, SandboxFactory
from .sandbox.files import remove_stale
from .sandbox.instance import InstanceLock, ReapReport, instance_alive, reap_orphans
from .sandbox.pool import SandboxPool
from .sandbox.pools import PolicyPools
from .sandbox.sessions import Session, SessionManager


class LocalLauncher:
    def __init__(
        self,
        config: LauncherConfig,
        *,
        policies: PolicySet | None = None,
        warm_override: int | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.policies = policies if policies is not None else load_policies(config.policies_dir)
        # The host's own policies, which pushed ones overlay (see ``apply_pushed_policies``).
        self._local_policies = PolicySet(list(self.policies), self.policies.directory)
        self._warm_override = warm_override
        self._progress = progress or (lambda message: None)
        self._lock: InstanceLock | None = None
        self.backend: DockerBackend | None = None
        self.capacity = Capacity(config.max_sandboxes)
        self._pools = PolicyPools(self._new_pool)
        self.sessions = SessionManager(self.pool_for)
        self._executor: Executor | None = None
        self.reaped: ReapReport | None = None

    async def start(self) -> None:
        config = self.config
        backend = DockerBackend(
            config.run_dir,
            timeout_s=config.engine_timeout_s,
            paths=EnginePaths(config.engine_paths),
        )
        self.backend = backend
        await backend.ping()
        if not await backend.image_present(config.image):
            raise ImageMissingError(
                f"sandbox image {config.image} is not built; run `duckcell image build` "
                "(or `make image`)"
            )
        # gVisor sandboxes only on an engine that applies the seccomp profile inside gVisor:
        # one warning line now if it does not, and each runsc query fails with it.
        gate = RuntimeGate(backend, docker_runtimes(backend))
        await gate.check_at_start([p.name for p in self.policies if p.runtime == RUNSC])
        self._lock = InstanceLock(config.instances_dir)
        self.reaped = await reap_orphans(
            backend,
            launcher_id=config.launcher_id,
            instances_dir=config.instances_dir,
            run_dir=config.run_dir,
            own_instance=self._lock.instance_id,
        )
        if self.reaped.removed:
            self._progress(f"removed {len(self.reaped.removed)} orphaned sandbox(es)")
        if config.cache_dir:
            # Session directories of launchers that died without removing them.
            own = self._lock.instance_id
            remove_stale(
                config.cache_dir,
                lambda owner: owner == own or instance_alive(config.instances_dir, owner),
            )
        factory = SandboxFactory(
            gate,
            FactorySettings(
                image=config.image,
                launcher_id=config.launcher_id,
                instance_id=self._lock.instance_id,
                cache_dir=str(config.cache_dir) if config.cache_dir else None,
                start_timeout_s=config.start_timeout_s,
            ),
        )
        self._factory = factory
        self._executor = Executor(
            backend, self.pool_for, self.sessions, kill_grace_s=config.kill_grace_s
        )
        self._warm_pools()

    def _warm_pools(self) -> None:
        """With the policies' own warm sizes (no ``warm_override``), every policy's pool starts
        filling now, in the background: a worker's first query finds a sandbox ready instead
        of paying a start. A caller that overrides the size warms what it needs (``warm``)."""
        if self._warm_override is not None or self._executor is None:
            return
        started = self._pools.warm_all(self.policies)
        if started:
            self._progress(f"warming pools in the background: {', '.join(started)}")

    @property
    def instance_id(self) -> str:
        """This process's id on the host: its lock, its sandboxes' label, its audit run."""
        if self._lock is None:
            raise RuntimeError("LocalLauncher.start() was not called")
        return self._lock.instance_id

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            raise RuntimeError("LocalLauncher.start() was not called")
        return self._executor

    def pool_for(self, policy: Policy) -> SandboxPool:
        return self._pools.pool_for(policy)

    def _new_pool(self, policy: Policy) -> SandboxPool:
        return SandboxPool(
            policy,
            self._factory,
            self.capacity,
            warm=self._warm_override,
            queue_timeout_s=self.config.queue_timeout_s,
            max_parallel_starts=self.config.max_parallel_starts,
        )

    def replace_policies(self, new: PolicySet) -> list[str]:
        """Make ``new`` the policies in force, without a restart; returns the replaced pools.

        ``self.policies`` is updated in place (the tunnel's query runner holds the same set),
        so queries and sessions that start from now on resolve the new versions. For each
        policy whose settings changed (or that is gone) the pool is retired: its idle warm
        sandboxes are destroyed, a pool for the new version starts, and queries already
        running and sessions already open keep the version they started with until they end.
        """
        replaced = self._pools.replace(new)
        self.policies.replace(new)
        self._warm_pools()  # a policy new to this host fills now too
        return replaced

    def apply_pushed_policies(self, pushed: Iterable[Policy]) -> list[str]:
        """Policies from the control plane: they override this host's same-named ones, the
        host's others stay (an empty push restores the host's own set).

        Raises ``PolicyError``, taking none, when one would run a policy this host runs under
        gVisor (runsc) with plain runc: the host's operator chose that isolation, and the
        control plane may tighten it, never drop it.
        """
        pushed = list(pushed)
        check_no_downgrade(self._local_policies, pushed)
        return self.replace_policies(self._local_policies.overlaid(pushed))

    async def warm(self, policy_name: str, timeout_s: float = 120.0) -> SandboxPool:
        """Start a policy's pool and wait for its first fill, reporting progress."""
        pool = self.pool_for(self.policies.get(policy_name))
        self._progress(f"warming pool {policy_name}: {pool.warm} sandbox(es)")
        await pool.wait_warm(timeout_s)
        return pool

    def run_query(
        self,
        sql: str,
        *,
        policy: str | None = None,
        session_id: str | None = None,
        data: TablePreparer | None = None,
        early: bool = False,
        tables: TableFiles | None = None,
        query_id: str | None = None,
    ) -> AbstractAsyncContextManager[QueryExecution]:
        """``Executor.run_query`` with the policy by name: ``async with`` it, read
        ``chunks()``; the tables are released however the query ends."""
        chosen = self.policies.get(policy) if policy else None
        return self.executor.run_query(
            sql,
            policy=chosen,
            session_id=session_id,
            data=data,
            early=early,
            tables=tables,
            query_id=query_id,
        )

    def execute(
        self, sql: str, *, policy: str | None = None, session_id: str | None = None
    ) -> QueryExecution:
        """A query without catalog tables, for the integration tests that hold it; everything
        else uses ``run_query``."""
        chosen = self.policies.get(policy) if policy else None
        return self.executor.execute(sql, policy=chosen, session_id=session_id)

    async def open_session(self, policy: str = "agent-session") -> Session:
        return await self.sessions.open(self.policies.get(policy))

    def close_session(self, session_id: str) -> None:
        self.sessions.close(session_id)

    async def close(self) -> None:
        for query_id in self.executor.running() if self._executor else []:
            await self.executor.cancel(query_id)
        await self.sessions.close_all()
        await self._pools.close()
        if self._lock is not None:
            self._lock.release()
        if self.backend is not None:
            self.backend.close()

    async def __aenter__(self) -> LocalLauncher:
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
