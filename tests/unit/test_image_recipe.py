"""The duckcell image's recipe without an engine: what its context holds, and that its hash
is its own (never equal to the sandbox image's over the same wheels and base)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.errors import ImageBuildError
from launcher.sandbox.image.build import WheelSet, content_hash
from launcher.sandbox.image.recipe import (
    DUCKCELL_SCHEME,
    duckcell_files,
    duckcell_recipe,
    runtime_packages,
    sandbox_recipe,
)

REPO = Path(__file__).resolve().parents[2]
WHEELS = WheelSet((("duckdb", "2.0.0"),), "x86_64")


def test_the_context_holds_the_package_policies_deploy_files_and_the_sample_table() -> None:
    names = [name for name, _ in duckcell_files(REPO, REPO / "launcher").entries]
    assert names[0] == "Dockerfile"
    assert "app/launcher/cli/main.py" in names and "app/launcher/protocol/runner_pb2.py" in names
    assert "app/policies/default.yaml" in names
    assert {"app/deploy/controlplane-start.sh", "app/deploy/catalog.yaml"} <= set(names)
    assert any(name.startswith("app/sample_data/trips/") for name in names)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    assert "app/deploy/Dockerfile" not in names


def test_the_hash_scheme_keeps_the_two_images_apart() -> None:
    files = duckcell_files(REPO, REPO / "launcher")
    assert content_hash(files, WHEELS, "sha256:b", DUCKCELL_SCHEME) != content_hash(
        files, WHEELS, "sha256:b", sandbox_recipe(package_dir=REPO / "launcher").scheme
    )
    assert duckcell_recipe(REPO / "launcher").scheme == DUCKCELL_SCHEME
    assert "pip" in duckcell_recipe(REPO / "launcher").packages
    assert {"duckdb", "grpcio", "docker"} <= set(runtime_packages())


def test_a_checkout_without_deploy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageBuildError, match="built from a source checkout"):
        duckcell_files(tmp_path, REPO / "launcher")
