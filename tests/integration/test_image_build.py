"""The sandbox image built for real: labels, reuse, and the wheels loading under hardening.

Builds the default tag (reusing it when current, as `make image` does). A missing engine fails
through the ``engine`` fixture; nothing here skips.
"""

from __future__ import annotations

import importlib.metadata

import docker
import pytest

from launcher.sandbox.image.build import (
    BASE_LABEL,
    DEFAULT_TAG,
    HASH_LABEL,
    BuiltImage,
    ImageBuilder,
)
from tests.conftest import RUN_ID, TEST_LAUNCHER_PREFIX

pytestmark = pytest.mark.docker

_IMPORTS = (
    "import duckdb, pyarrow, grpc, google.protobuf, launcher.protocol.runner_pb2_grpc; "
    "print(duckdb.__version__, pyarrow.__version__, grpc.__version__, "
    "duckdb.sql('SELECT 42 AS x').fetchall()[0][0])"
)


@pytest.fixture(scope="module")
def built(engine: docker.DockerClient) -> BuiltImage:
    return ImageBuilder(client=engine, tag=DEFAULT_TAG).build()


def test_build_is_labelled_and_reused(engine: docker.DockerClient, built: BuiltImage) -> None:
    labels = engine.images.get(built.tag).labels
    assert labels[HASH_LABEL] == built.content_hash
    assert labels["duckcell.image"] == "sandbox"
    assert labels[BASE_LABEL]

    builder = ImageBuilder(client=engine, tag=DEFAULT_TAG)
    again = builder.build()
    assert again.reused
    assert again.content_hash == built.content_hash
    assert again.seconds < 10
    assert builder.is_current()


@pytest.mark.parametrize("runtime", ["runc", pytest.param("runsc", marks=pytest.mark.runsc)])
def test_wheels_load_in_a_hardened_container(
    engine: docker.DockerClient, built: BuiltImage, runtime: str
) -> None:
    output = engine.containers.run(
        built.tag,
        entrypoint=["python3", "-c", _IMPORTS],
        runtime=runtime,
        network_mode="none",
        read_only=True,
        user="65534:65534",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        labels={"duckcell.launcher": f"{TEST_LAUNCHER_PREFIX}{RUN_ID}-image"},
        remove=True,
    )
    duckdb_version, pyarrow_version, grpc_version, answer = output.decode().split()
    # The same versions as the launcher: both ends of the protocol agree.
    assert duckdb_version == importlib.metadata.version("duckdb")
    assert pyarrow_version == importlib.metadata.version("pyarrow")
    assert grpc_version == importlib.metadata.version("grpcio")
    assert answer == "42"
