"""The image builder without an engine: content hash, resource lookup, wheel pins, the build
context, and the reuse and base decisions against an in-memory engine.

The sandbox and launcher trees here are fixtures, so these tests do not depend on the real
runner or on generated protocol code being present.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from launcher.errors import ImageBuildError
from launcher.sandbox.image.build import (
    BASE_LABEL,
    HASH_LABEL,
    OFFLINE_BASE,
    PYTHON_BASE,
    ContextFiles,
    ImageBuilder,
    Installed,
    WheelSet,
    content_hash,
    find_sandbox_dir,
    site_dir,
    write_context,
)

REPO = Path(__file__).resolve().parents[2]
WHEELS = WheelSet((("duckdb", "2.0.0"), ("grpcio", "1.85.1")), "x86_64")


def _tree(root: Path) -> tuple[Path, Path]:
    """A sandbox_image/ and a launcher/ package, as small as the builder accepts."""
    sandbox = root / "sandbox_image"
    runner = sandbox / "runner" / "duckcell_runner"
    (runner / "__pycache__").mkdir(parents=True)
    (sandbox / "Dockerfile").write_text("FROM scratch\n")
    (runner / "__init__.py").write_text('"""runner"""\n')
    (runner / "__main__.py").write_text("print('runner')\n")
    (runner / "__pycache__" / "__main__.cpython-311.pyc").write_bytes(b"\0stale")
    package = root / "launcher"
    (package / "protocol").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "protocol" / "__init__.py").write_text("")
    (package / "protocol" / "runner.proto").write_text('syntax = "proto3";\n')
    (package / "protocol" / "runner_pb2.py").write_text("# generated\n")
    (package / "protocol" / "runner_pb2_grpc.py").write_text("# generated\n")
    return sandbox, package


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    return _tree(tmp_path / "repo")


def _hash(sandbox: Path, package: Path, wheels: WheelSet = WHEELS, base: str = "sha256:b") -> str:
    return content_hash(ContextFiles.collect(sandbox, package), wheels, base)


def test_collect_takes_runner_and_protocol_code_only(tree: tuple[Path, Path]) -> None:
    names = [name for name, _ in ContextFiles.collect(*tree).entries]
    assert names == [
        "Dockerfile",
        "app/duckcell_runner/__init__.py",
        "app/duckcell_runner/__main__.py",
        "app/launcher/__init__.py",
        "app/launcher/protocol/__init__.py",
        "app/launcher/protocol/runner_pb2.py",
        "app/launcher/protocol/runner_pb2_grpc.py",
    ]


def test_content_hash_is_stable_and_independent_of_location(
    tree: tuple[Path, Path], tmp_path: Path
) -> None:
    first = _hash(*tree)
    assert first == _hash(*tree)
    assert first == _hash(*_tree(tmp_path / "elsewhere"))
    assert len(first) == 64


@pytest.mark.parametrize(
    "change",
    [
        lambda s, p: (s / "runner" / "duckcell_runner" / "__main__.py").write_text("print(2)\n"),
        lambda s, p: (s / "runner" / "duckcell_runner" / "service.py").write_text("x = 1\n"),
        lambda s, p: (s / "Dockerfile").write_text("FROM scratch\nUSER 1\n"),
        lambda s, p: (p / "protocol" / "runner_pb2.py").write_text("# regenerated\n"),
    ],
    ids=["runner-edit", "runner-new-file", "dockerfile", "protocol"],
)
def test_content_hash_changes_with_the_sources(tree: tuple[Path, Path], change: Any) -> None:
    before = _hash(*tree)
    change(*tree)
    assert _hash(*tree) != before


def test_content_hash_ignores_bytecode_and_proto_sources(tree: tuple[Path, Path]) -> None:
    sandbox, package = tree
    before = _hash(sandbox, package)
    (sandbox / "runner" / "duckcell_runner" / "__pycache__" / "x.pyc").write_bytes(b"1")
    (package / "protocol" / "runner.proto").write_text("// edited\n")
    assert _hash(sandbox, package) == before


def test_content_hash_changes_with_wheels_and_base(tree: tuple[Path, Path]) -> None:
    before = _hash(*tree)
    newer = WheelSet((("duckdb", "2.0.1"), ("grpcio", "1.85.1")), "x86_64")
    assert _hash(*tree, wheels=newer) != before
    assert _hash(*tree, wheels=WheelSet(WHEELS.versions, "aarch64")) != before
    assert _hash(*tree, base="sha256:other") != before


def test_collect_names_what_is_missing(tree: tuple[Path, Path]) -> None:
    sandbox, package = tree
    (package / "protocol" / "runner_pb2_grpc.py").unlink()
    with pytest.raises(ImageBuildError, match="make proto"):
        ContextFiles.collect(sandbox, package)
    (sandbox / "runner" / "duckcell_runner" / "__main__.py").unlink()
    with pytest.raises(ImageBuildError, match="runner is missing"):
        ContextFiles.collect(sandbox, package)


def test_sandbox_dir_prefers_the_repo_copy(tmp_path: Path) -> None:
    package = tmp_path / "launcher"
    for where in (tmp_path / "sandbox_image", package / "_resources" / "sandbox_image"):
        where.mkdir(parents=True)
        (where / "Dockerfile").write_text("FROM scratch\n")
    assert find_sandbox_dir(package) == tmp_path / "sandbox_image"


def test_sandbox_dir_falls_back_to_the_wheel_resources(tmp_path: Path) -> None:
    shipped = tmp_path / "launcher" / "_resources" / "sandbox_image"
    shipped.mkdir(parents=True)
    (shipped / "Dockerfile").write_text("FROM scratch\n")
    assert find_sandbox_dir(tmp_path / "launcher") == shipped
    with pytest.raises(ImageBuildError, match="reinstall"):
        find_sandbox_dir(tmp_path / "nowhere" / "launcher")


def test_sandbox_dir_in_this_repo() -> None:
    assert find_sandbox_dir() == REPO / "sandbox_image"


def test_wheels_pin_the_whole_closure_at_installed_versions() -> None:
    here = {
        "grpcio": Installed("1.85.1", ("typing_extensions",)),
        "typing-extensions": Installed("4.15.0", ()),
        "duckdb": Installed("2.0.0", ("not-installed-here",)),
    }
    wheels = WheelSet.pinned("x86_64", ["DuckDB", "grpcio"], here.get)
    assert wheels.requirements() == ["duckdb==2.0.0", "grpcio==1.85.1", "typing-extensions==4.15.0"]
    with pytest.raises(ImageBuildError, match="pyarrow is not installed"):
        WheelSet.pinned("x86_64", ["pyarrow"], here.get)


def test_wheel_platforms_cover_bookworm_glibc() -> None:
    platforms = WHEELS.platforms()
    assert {"manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"} <= set(
        platforms
    )
    assert platforms[-1] == "manylinux_2_36_x86_64"


def test_context_is_reproducible_and_owned_by_root(tree: tuple[Path, Path], tmp_path: Path) -> None:
    site = tmp_path / "site" / "duckdb"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    files = ContextFiles.collect(*tree)
    first, second = io.BytesIO(), io.BytesIO()
    write_context(first, files, site.parent)
    (site / "__init__.py").touch()  # a new mtime must not change the context
    write_context(second, files, site.parent)
    assert first.getvalue() == second.getvalue()
    with tarfile.open(fileobj=io.BytesIO(first.getvalue())) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert {"Dockerfile", "site/duckdb", "site/duckdb/__init__.py"} <= set(members)
    assert all(m.uid == 0 and m.gid == 0 for m in members.values())
    assert members["site/duckdb/__init__.py"].mode == 0o644


@dataclass
class FakeEngine:
    """Answers the engine calls ImageBuilder makes, from memory; no registry answers pulls."""

    images: dict[str, dict[str, Any]] = field(default_factory=dict)
    build_events: list[dict[str, Any]] = field(default_factory=list)
    pulls: list[str] = field(default_factory=list)
    builds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def api(self) -> FakeEngine:
        return self

    def add(self, ref: str, image_id: str, labels: dict[str, str] | None = None) -> None:
        self.images[ref] = {"Id": image_id, "Config": {"Labels": labels}}

    def version(self) -> dict[str, str]:
        return {"Arch": "amd64"}

    def inspect_image(self, ref: str) -> dict[str, Any]:
        if ref not in self.images:
            raise docker.errors.ImageNotFound(f"No such image: {ref}")
        return self.images[ref]

    def pull(self, ref: str, stream: bool, decode: bool) -> Iterator[dict[str, str]]:
        self.pulls.append(ref)
        yield {"error": "Get https://registry-1.docker.io/v2/: no such host"}

    def build(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
        with tarfile.open(fileobj=kwargs["fileobj"]) as tar:
            self.builds.append({**kwargs, "names": tar.getnames()})
        yield from self.build_events
        self.add(kwargs["tag"], "sha256:built", kwargs["labels"])

    def remove_image(self, image_id: str) -> None:
        self.images = {k: v for k, v in self.images.items() if v["Id"] != image_id}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A wheel cache that already holds this host's wheel set, so no test runs pip."""
    site = site_dir(WheelSet.pinned("x86_64"), tmp_path / "cache") / "duckdb"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("")
    return tmp_path / "cache"


def _builder(
    engine: FakeEngine, tree: tuple[Path, Path], cache: Path, lines: list[str] | None = None
) -> ImageBuilder:
    sandbox, package = tree
    return ImageBuilder(
        client=engine,  # type: ignore[arg-type]
        tag="sandbox:test",
        progress=None if lines is None else lines.append,
        sandbox_dir=sandbox,
        package_dir=package,
        cache_dir=cache,
        pull_deadline_s=2,
    )


def test_offline_path_builds_on_the_debootstrap_base(tree: tuple[Path, Path], cache: Path) -> None:
    engine = FakeEngine(build_events=[{"stream": "Step 1/2 : FROM x\n"}, {"stream": " ---> a\n"}])
    engine.add(OFFLINE_BASE, "sha256:offline")
    lines: list[str] = []
    builder = _builder(engine, tree, cache, lines)
    built = builder.build()
    assert not built.reused
    assert engine.pulls == [PYTHON_BASE]
    (build,) = engine.builds
    assert build["buildargs"] == {"BASE_IMAGE": OFFLINE_BASE}
    assert build["labels"][HASH_LABEL] == built.content_hash
    assert {"Dockerfile", "app/duckcell_runner/__main__.py", "site/duckdb"} <= set(build["names"])
    assert "building image: step 1/2: FROM x" in lines
    assert builder.is_current()


def test_current_image_is_reused_without_pull_or_build(
    tree: tuple[Path, Path], cache: Path
) -> None:
    engine = FakeEngine()
    engine.add(OFFLINE_BASE, "sha256:offline")
    digest = content_hash(ContextFiles.collect(*tree), WheelSet.pinned("x86_64"), "sha256:offline")
    engine.add("sandbox:test", "sha256:old", {HASH_LABEL: digest, BASE_LABEL: OFFLINE_BASE})
    built = _builder(engine, tree, cache).build()
    assert built.reused and built.image_id == "sha256:old"
    assert engine.pulls == [] and engine.builds == []
    (tree[0] / "runner" / "duckcell_runner" / "__main__.py").write_text("print(3)\n")
    assert not _builder(engine, tree, cache).is_current()


def test_explicit_base_wins_and_replaced_image_is_dropped(
    tree: tuple[Path, Path], cache: Path
) -> None:
    engine = FakeEngine()
    engine.add(PYTHON_BASE, "sha256:python")
    engine.add("my/base:1", "sha256:mine")
    engine.add("sandbox:test", "sha256:old", {HASH_LABEL: "stale"})
    _builder(engine, tree, cache).build(base="my/base:1")
    assert engine.builds[0]["buildargs"] == {"BASE_IMAGE": "my/base:1"}
    assert engine.pulls == []
    assert "sha256:old" not in {image["Id"] for image in engine.images.values()}


def test_a_failing_step_is_reported_with_its_output(tree: tuple[Path, Path], cache: Path) -> None:
    engine = FakeEngine(
        build_events=[
            {"stream": "Step 9/15 : RUN python3 -c 'import duckdb'\n"},
            {"stream": "ModuleNotFoundError: No module named 'typing_extensions'\n"},
            {"error": "The command returned a non-zero code: 1", "errorDetail": {"code": 1}},
        ]
    )
    engine.add(PYTHON_BASE, "sha256:python")
    with pytest.raises(ImageBuildError, match=r"step 9/15: The command .*typing_extensions"):
        _builder(engine, tree, cache).build()
