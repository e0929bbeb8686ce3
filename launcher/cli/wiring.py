"""What several commands build the same way: the control plane's CA from ``--ca-file`` (for
``query --control-plane`` and ``mcp --control-plane``), the host's data path for ``--catalog``
(for ``query`` and ``mcp`` in local mode), and where sandboxes' mounts are placed when the
command runs in the worker's container (``query``, ``mcp``, ``sandboxes``)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509

from ..config import LauncherConfig
from ..data.cache import ObjectCache
from ..data.datapath import DataPath
from ..errors import DuckcellError
from ..inputs import read_small_file
from ..model.catalog import load_catalog
from ..model.sql import ParserPool
from .secrets import secret_store
from .worker import place_sandboxes


def control_plane_ca(ca_file: Path | None) -> bytes:
    """The PEM certificate ``--ca-file`` names; raises ``DuckcellError`` saying how to get it
    when the flag is missing or the file is not a certificate."""
    if ca_file is None:
        raise DuckcellError("--control-plane needs --ca-file PEM (`duckcell controlplane ca`)")
    ca_pem = read_small_file(ca_file, "--ca-file", "the control plane's CA certificate")
    try:
        x509.load_pem_x509_certificate(ca_pem)
    except ValueError:
        raise DuckcellError(
            f"--ca-file: {ca_file} is not a PEM certificate; get the control plane's with "
            "`duckcell controlplane ca --data DIR > FILE`"
        ) from None
    return ca_pem


def local_data_path(
    catalog: Path | None, config: LauncherConfig, parser: ParserPool | None
) -> DataPath | None:
    """The data path for ``--catalog``; its cache is ``cache_dir``, else STATE_DIR/cache, and
    ``{store: NAME}`` secrets come from STATE_DIR/secrets."""
    if catalog is None or parser is None:
        return None
    tables = load_catalog(catalog)  # first: a catalog that fails to load opens no cache
    cache = ObjectCache(config.cache_root, budget_bytes=config.cache_budget_bytes)
    return DataPath(tables, cache, parser=parser, secrets=secret_store(config.state_dir))


async def placed(config: LauncherConfig) -> LauncherConfig:
    """In the worker's container (``DUCKCELL_HOST_PATHS``, which the duckcell image sets), the
    config with the engine's view of STATE and the cache and the worker's sandbox label, so a
    command run there places its sandboxes' mounts as the worker does; elsewhere ``config``."""
    setting = os.environ.get("DUCKCELL_HOST_PATHS", "none")
    return await place_sandboxes(setting, config, os.environ)
