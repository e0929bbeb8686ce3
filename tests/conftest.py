"""Shared test settings: every test-made sandbox carries a launcher id starting with ``test-``."""

from __future__ import annotations

import os
import uuid

# Fixtures every tier shares, kept beside the support code they build on.
pytest_plugins = ["tests.support.controlplane"]

TEST_LAUNCHER_PREFIX = "test-"
RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
