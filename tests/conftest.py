"""Shared test settings: every test-made sandbox carries a launcher id starting with ``test-``."""

from __future__ import annotations

import os
import uuid

TEST_LAUNCHER_PREFIX = "test-"
RUN_ID = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
