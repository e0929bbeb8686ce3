"""Control-plane policies: the store, the CLI, the role check, the watcher and the push."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from launcher.cli.main import main
from launcher.controlplane.catalogs import CONFIG_LOCK, CatalogVersion, apply_catalog, read_catalog
from launcher.controlplane.datadir import ControlPlaneData
from launcher.controlplane.policies import (
    EMPTY,
    POLICIES_FILE,
    PolicyWatcher,
    apply_policies,
    policy_files,
    read_policies,
    remove_policy,
)
from launcher.controlplane.server import config_push
from launcher.errors import CatalogError, PolicyError
from launcher.model.catalog import load_catalog
from launcher.model.policy import Policy, load_pushed_policies, same_settings
from launcher.protocol import controlplane_pb2 as pb
from launcher.worker.tunnel import TunnelClient
from tests.support.controlplane import DEADLINE_S, FAST, ControlPlane
from tests.support.waiting import eventually, run

POLICY = """# a comment that is kept
name: {name}
isolation: query
runtime: runc
limits:
  cpus: 1
  memory: 512MiB
  statement_timeout: {timeout}
"""
CATALOG = """
connections:
  local: {kind: local}
tables: {}
roles:
  analyst: {policy: fast}
"""


def write(directory: Path, name: str, timeout: str = "5s", text: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yaml"
    path.write_text(text if text is not None else POLICY.format(name=name, timeout=timeout))
    return path


def test_apply_list_show_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data, src = tmp_path / "cp", tmp_path / "src"
    fast, slow = write(src, "fast", "2s"), write(src, "slow", "10m")
    assert read_policies(data) == EMPTY and EMPTY.revision == ""

    assert main(["controlplane", "policy", "apply", "--data", str(data), str(fast), str(slow)]) == 0
    assert "applied: fast, slow" in capsys.readouterr().err
    assert main(["controlplane", "policy", "list", "--data", str(data)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["fast", "slow"]
    assert all(line.split()[1].startswith("sha256:") for line in listed)
    assert main(["controlplane", "policy", "show", "--data", str(data), "fast"]) == 0
    assert capsys.readouterr().out == fast.read_text()  # as written, comments included

    first = read_policies(data).revision
    write(src, "fast", "3s")
    apply_policies(data, [fast])  # an update keeps the others
    assert read_policies(data).names() == ["fast", "slow"]
    assert read_policies(data).revision not in ("", first)

    assert main(["controlplane", "policy", "remove", "--data", str(data), "slow"]) == 0
    assert read_policies(data).names() == ["fast"]
    assert main(["controlplane", "policy", "remove", "--data", str(data), "slow"]) != 0
    assert "no control-plane policy 'slow'; known: fast" in capsys.readouterr().err
    assert [p.name for p in data.iterdir() if p.name.startswith(".")] == [CONFIG_LOCK]


def test_a_bad_file_changes_nothing_and_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, src = tmp_path / "cp", tmp_path / "src"
    apply_policies(data, [write(src, "fast")])
    before = (data / POLICIES_FILE).read_bytes()
    good = write(src, "other")
    bad = write(src, "bad", text=POLICY.format(name="bad", timeout="soon"))
    args = ["controlplane", "policy", "apply", "--data", str(data), str(good), str(bad)]
    assert main(args) != 0
    assert f"{bad}:8: limits.statement_timeout: expected a duration" in capsys.readouterr().err
    assert (data / POLICIES_FILE).read_bytes() == before
    misnamed = write(src, "renamed", text=POLICY.format(name="fast", timeout="1s"))
    with pytest.raises(PolicyError, match=rf"{misnamed}:2: name: expected \"renamed\""):
        apply_policies(data, [misnamed])
    assert (data / POLICIES_FILE).read_bytes() == before
    assert sorted(p.name for p in data.iterdir()) == [CONFIG_LOCK, "policies.json"]  # no partial


def test_roles_must_name_control_plane_policies_once_it_has_any(tmp_path: Path) -> None:
    data, src = tmp_path / "cp", tmp_path / "src"
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    apply_catalog(data, catalog, policies=[])  # none of its own: roles name worker policies
    with pytest.raises(PolicyError, match=r"'fast' \(named by role 'analyst'\)"):
        apply_policies(data, [write(src, "slow")])
    apply_policies(data, [write(src, "slow"), write(src, "fast")])
    with pytest.raises(PolicyError, match="named by role 'analyst'"):
        remove_policy(data, "fast")
    with pytest.raises(CatalogError, match=r"role 'analyst' names policy 'fast'.*policy apply"):
        apply_catalog(data, catalog, policies=["slow"])
    assert apply_catalog(data, catalog, policies=["fast", "slow"]).catalog.roles


def test_serve_flags_apply_policies_and_a_catalog_together(tmp_path: Path) -> None:
    """``serve --policies DIR --catalog FILE`` checks the roles against the new catalog, and
    the directory replaces the stored set (a file deleted from it is pushed no more)."""
    data, src = tmp_path / "cp", tmp_path / "src"
    apply_policies(data, [write(tmp_path / "old", "gone")])
    write(src, "fast")
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG)
    apply_policies(data, policy_files(src), catalog=load_catalog(catalog), replace=True)
    apply_catalog(data, catalog, policies=lambda: read_policies(data).names())
    assert read_catalog(data).catalog.roles["analyst"].policy == "fast"
    assert read_policies(data).names() == ["fast"]


def test_watcher_reports_new_revisions_and_ignores_a_broken_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, src = tmp_path / "cp", tmp_path / "src"
    seen: list[str] = []
    watcher = PolicyWatcher(data, lambda documents: seen.append(documents.revision))
    assert not watcher.check()
    documents, _ = apply_policies(data, [write(src, "fast")])
    assert watcher.check() and seen == [documents.revision]
    (data / POLICIES_FILE).write_text('{"policies": {"fast": "name: [oops"}}')
    with caplog.at_level(logging.ERROR):
        assert not watcher.check()
    assert watcher.current == documents and "keeping revision" in caplog.text


def test_config_push_round_trips_the_policies(tmp_path: Path) -> None:
    data, src = tmp_path / "cp", tmp_path / "src"
    documents, applied = apply_policies(data, [write(src, "fast", "2s"), write(src, "slow")])
    catalog = read_catalog(data)
    wire = config_push(catalog, documents).SerializeToString()
    push = pb.ConfigPush.FromString(wire)
    assert push.revision == catalog.revision and push.policies_revision == documents.revision
    pushed = load_pushed_policies((doc.name, doc.yaml) for doc in push.policies)
    assert [p.name for p in pushed] == ["fast", "slow"]
    assert all(same_settings(a, b) for a, b in zip(pushed, applied, strict=True))
    assert pushed[0].limits.statement_timeout_s == 2.0
    empty = pb.ConfigPush.FromString(
        config_push(CatalogVersion.of(catalog.catalog), EMPTY).SerializeToString()
    )
    assert list(empty.policies) == [] and empty.policies_revision == ""


def test_a_worker_gets_policy_edits_without_reconnecting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = ControlPlaneData(tmp_path / "cp")
    src = tmp_path / "src"
    apply_policies(data.root, [write(src, "fast", "2s")])
    control_plane = ControlPlane(data)

    async def scenario() -> None:
        await control_plane.start()
        identity = await control_plane.enroll(tmp_path / "worker")
        received: list[list[Policy]] = []

        def take(policies: list[Policy]) -> None:  # as LocalLauncher.apply_pushed_policies
            if any(policy.name == "refused" for policy in policies):
                raise PolicyError("controlplane:refused.yaml: runtime: refused by the worker")
            received.append(policies)

        client = TunnelClient(identity, backoff=FAST, on_policies=take)
        running = asyncio.create_task(client.run())
        await asyncio.wait_for(client.connected.wait(), DEADLINE_S)
        await eventually(lambda: len(received) == 1, "policies pushed after the Welcome")
        assert received[0][0].limits.statement_timeout_s == 2.0

        apply_policies(data.root, [write(src, "fast", "7s")])
        await eventually(lambda: len(received) == 2, "the edit is pushed within a poll")
        assert received[1][0].limits.statement_timeout_s == 7.0
        remove_policy(data.root, "fast")
        await eventually(lambda: len(received) == 3, "the removal is pushed")
        assert received[2] == [] and client.policies_revision == ""

        # An invalid push (a control plane of another version, say) changes nothing.
        bad = POLICY.format(name="fast", timeout="never")
        push = pb.ConfigPush(
            policies=[pb.PolicyDocument(name="fast", yaml=bad)], policies_revision="r-bad"
        )
        with caplog.at_level(logging.ERROR):
            client._apply_config(push)  # the reader's handler, fed directly
        assert len(received) == 3 and client.policies_revision == ""
        assert "controlplane:fast.yaml:8: limits.statement_timeout" in caplog.text
        # One the worker's own check refuses keeps the revision, so a later push is not lost.
        refused = POLICY.format(name="refused", timeout="3s")
        push = pb.ConfigPush(
            policies=[pb.PolicyDocument(name="refused", yaml=refused)], policies_revision="r-no"
        )
        client._apply_config(push)
        assert len(received) == 3 and client.policies_revision == ""
        # A repeat of the revision in force (a reconnect) is not applied again.
        good = POLICY.format(name="fast", timeout="4s")
        push = pb.ConfigPush(
            policies=[pb.PolicyDocument(name="fast", yaml=good)], policies_revision="r-4"
        )
        client._apply_config(push)
        client._apply_config(push)
        assert len(received) == 4 and client.policies_revision == "r-4"
        assert client.connections == 1

        client.stop()
        await asyncio.wait_for(running, DEADLINE_S)

    try:
        run(scenario)
    finally:
        control_plane.close()
