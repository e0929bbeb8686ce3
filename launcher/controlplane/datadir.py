"""The control plane's data directory: its CA (``ca/``) and its SQLite state.

Every control-plane command takes ``--data DIR`` and reaches its parts through here, so the
layout is decided in one place.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .apikeys import ApiKeys
from .ca import CertificateAuthority
from .catalogs import CATALOG_FILE
from .policies import POLICIES_FILE
from .store import open_database
from .tokens import EnrollmentTokens

CA_DIR = "ca"
DATABASE = "controlplane.db"


@dataclass(frozen=True, slots=True)
class ControlPlaneData:
    root: Path

    def initialized(self) -> bool:
        """Whether a control plane has used this directory (it holds a CA, a database, a
        catalog or policies)."""
        parts = (CA_DIR, DATABASE, CATALOG_FILE, POLICIES_FILE)
        return any((self.root / part).exists() for part in parts)

    def ca(self) -> CertificateAuthority:
        """The CA, created on first use (key file mode 0600)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return CertificateAuthority.load_or_create(self.root / CA_DIR)

    def database(self) -> sqlite3.Connection:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return open_database(self.root / DATABASE)

    def tokens(self) -> EnrollmentTokens:
        return EnrollmentTokens(self.database(), ca_fingerprint=self.ca().fingerprint())

    def api_keys(self) -> ApiKeys:
        return ApiKeys(self.database())
