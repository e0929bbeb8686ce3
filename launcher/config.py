"""The launcher's configuration: one frozen object, loaded in one place.

Precedence: command-line flags > ``DUCKCELL_*`` environment > YAML file (``--config`` or
``DUCKCELL_CONFIG``) > defaults. Components receive the part they need and never read the
environment themselves.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .resources import policies_dir
from .yamlfile import parse_size as size_or_none

GiB = 2**30
DEFAULT_CACHE_BUDGET_BYTES = 10 * GiB


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/duckcell")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "duckcell"


@dataclass(frozen=True, slots=True)
class LauncherConfig:
    launcher_id: str
    state_dir: Path
    policies_dir: Path
    image: str = "duckcell-sandbox:latest"
    cache_dir: Path | None = None
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES
    max_sandboxes: int = 8
    max_parallel_starts: int = 2
    queue_timeout_s: float = 30.0
    engine_timeout_s: float = 30.0
    start_timeout_s: float = 60.0
    kill_grace_s: float = 5.0

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    @property
    def instances_dir(self) -> Path:
        return self.state_dir / "instances"

    @property
    def cache_root(self) -> Path:
        """The object cache: ``cache_dir``, else ``STATE_DIR/cache`` (a host directory)."""
        return self.cache_dir or self.state_dir / "cache"


_ENV = {
    "launcher_id": "DUCKCELL_LAUNCHER_ID",
    "state_dir": "DUCKCELL_STATE_DIR",
    "policies_dir": "DUCKCELL_POLICIES_DIR",
    "image": "DUCKCELL_IMAGE",
    "cache_dir": "DUCKCELL_CACHE_DIR",
    "cache_budget_bytes": "DUCKCELL_CACHE_BUDGET",
    "max_sandboxes": "DUCKCELL_MAX_SANDBOXES",
    "max_parallel_starts": "DUCKCELL_MAX_PARALLEL_STARTS",
    "queue_timeout_s": "DUCKCELL_QUEUE_TIMEOUT",
    "engine_timeout_s": "DUCKCELL_ENGINE_TIMEOUT",
    "start_timeout_s": "DUCKCELL_START_TIMEOUT",
    "kill_grace_s": "DUCKCELL_KILL_GRACE",
}
_FLAGS = {"cache_budget_bytes": "--cache-budget"}  # flags not spelled like their setting
_SIZES = {"cache_budget_bytes"}  # settings written as sizes ("10GiB") or plain bytes


def parse_size(text: str) -> int:
    """``"10GiB"``, ``"500MB"``, ``"1.5 GiB"`` or plain bytes, as bytes.

    Raises ValueError saying what a size looks like.
    """
    size = size_or_none(text)
    if size is None:
        raise ValueError('expected a size like "10GiB", "500MB" or a number of bytes')
    return size


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = {f.name: f.type for f in fields(LauncherConfig)}[name]
    try:
        if name in _SIZES:
            numeric = isinstance(value, int) and not isinstance(value, bool)
            size = value if numeric else parse_size(str(value))
            if size < 1:
                raise ValueError("must be at least 1 byte")
            return size
        if "Path" in str(kind):
            return Path(str(value)).expanduser()
        if kind == "int":
            number = int(value)
            if number < 1:
                raise ValueError("must be at least 1")
            return number
        if kind == "float":
            number = float(value)
            if number <= 0:
                raise ValueError("must be positive")
            return number
        return str(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{origin}: {name}: invalid value {value!r} ({error})") from None


def _from_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config file (not UTF-8 text)") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of settings")
    known = {f.name for f in fields(LauncherConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return {key: _coerce(key, value, str(path)) for key, value in data.items()}


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> LauncherConfig:
    env = os.environ if env is None else env
    state_dir = _default_state_dir()
    values: dict[str, Any] = {
        "state_dir": state_dir,
        "policies_dir": policies_dir(),
    }
    file_path = config_file
    if file_path is None and env.get("DUCKCELL_CONFIG"):
        file_path = Path(env["DUCKCELL_CONFIG"])
    if file_path is not None:
        values.update(_from_yaml(file_path))
    for name, variable in _ENV.items():
        if env.get(variable):
            values[name] = _coerce(name, env[variable], f"environment {variable}")
    for name, value in (flags or {}).items():
        if value is not None:
            flag = _FLAGS.get(name, f"--{name.replace('_', '-')}")
            values[name] = _coerce(name, value, flag)
    if "launcher_id" not in values:
        values["launcher_id"] = default_launcher_id(values["state_dir"])
    return LauncherConfig(**values)


def default_launcher_id(state_dir: Path) -> str:
    """Host name plus a digest of the state directory.

    Orphan reaping trusts the instance locks in one state directory, so two launchers on one
    host with different state directories (root and a user, say) must never share an id.
    """
    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
    return f"{socket.gethostname()}-{digest}"
