"""Where the shipped policies and the sandbox image sources are.

From a source checkout (or an editable install) they are the repository's top-level
``policies/`` and ``sandbox_image/``; a wheel carries copies under ``launcher/_resources``.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # the ``launcher`` package


def _find(name: str) -> Path:
    repo_copy = PACKAGE_DIR.parent / name
    if repo_copy.is_dir():
        return repo_copy
    return PACKAGE_DIR / "_resources" / name


def policies_dir() -> Path:
    return _find("policies")


def sandbox_image_dir() -> Path:
    return _find("sandbox_image")
