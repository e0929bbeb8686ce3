"""scripts/ensure-docker.sh repairs a runsc registration that would leave gVisor unhardened.

The script's functions run for real against a daemon.json in a temporary directory, with the
engine around them stubbed (its ``docker info`` answer, dockerd's pid, the reload): nothing
here touches the host's engine. It must read runsc's flags as runsc does (and as
``launcher.sandbox.backend.runtimes`` does): ``--host-uds=all`` is not ``create``, and a later
``--oci-seccomp=false`` undoes an earlier ``--oci-seccomp``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from launcher.sandbox.backend.runtimes import runsc_problem

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "ensure-docker.sh"
WANTED = ["--network=none", "--host-uds=create", "--oci-seccomp"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _bash(body: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The script without its last line (`main "$@"`): its functions, nothing run. As if root,
    # with runsc installed (both readonly in bash and the script, so edited in).
    edits = [
        r"s/^main \"\$@\"$//",
        r"s/\$EUID -ne 0/0 -ne 0/",
        "s|^readonly RUNSC=.*|RUNSC=/bin/true|",
    ]
    sed = " ".join(f"-e '{edit}'" for edit in edits)
    prelude = f'source <(sed {sed} "{SCRIPT}")\n'
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", prelude + body, "test", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _missing(runtime_args: list[str]) -> list[str]:
    entry = json.dumps({"path": "/usr/bin/runsc", "runtimeArgs": runtime_args})
    done = _bash('runsc_flags_missing "$1"', entry)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize(
    ("runtime_args", "missing"),
    [
        (WANTED, []),
        (["--network=none", "--host-uds=all", "--oci-seccomp"], ["--host-uds=create"]),
        (["--network=none", "--host-uds", "open", "--oci-seccomp"], ["--host-uds=create"]),
        (["--network=none", "--host-uds=create", "--oci-seccomp", "--oci-seccomp=false"],
         ["--oci-seccomp"]),
        (["--network=none", "--host-uds=create"], ["--oci-seccomp"]),
        ([], WANTED),
    ],
)  # fmt: skip
def test_flags_are_read_as_runsc_and_the_launcher_read_them(
    runtime_args: list[str], missing: list[str]
) -> None:
    assert _missing(runtime_args) == missing
    launcher_ok = runsc_problem({"runsc": {"path": "/x", "runtimeArgs": runtime_args}}) is None
    assert launcher_ok == (not set(missing) & {"--host-uds=create", "--oci-seccomp"})


def test_a_running_engine_with_host_uds_all_is_repaired(tmp_path: Path) -> None:
    config = tmp_path / "daemon.json"
    before = ["--debug-log", "/var/log/runsc/", "--host-uds", "all", "--network=none"]
    config.write_text(
        json.dumps({"log-level": "warn", "runtimes": {"runsc": {"path": "/usr/bin/runsc",
                                                                  "runtimeArgs": before}}})
    )  # fmt: skip
    registered = json.dumps({"path": "/usr/bin/runsc", "runtimeArgs": before})
    stubs = f"""
        runsc_json() {{ echo '{registered}'; }}
        local_dockerd_pid() {{ echo 4242; }}
        daemon_config_of() {{ echo "{config}"; }}
        kill() {{ echo "kill $*" >&2; }}
        confirm_runsc() {{ true; }}
        ensure_runsc_on_running_engine
    """
    done = _bash(stubs)
    assert done.returncode == 0, done.stderr
    assert "registered runsc with --host-uds=create --oci-seccomp; reloading dockerd" in (
        done.stderr
    )
    assert "kill -HUP 4242" in done.stderr
    written = json.loads(config.read_text())
    assert written["log-level"] == "warn"
    args = written["runtimes"]["runsc"]["runtimeArgs"]
    assert args == [
        "--debug-log",
        "/var/log/runsc/",
        "--network=none",
        "--host-uds=create",
        "--oci-seccomp",
    ]
    assert runsc_problem({"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": args}}) is None
    assert (tmp_path / "daemon.json.duckcell-backup").exists()
