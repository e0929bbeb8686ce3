"""The launcher's configuration: one frozen object, loaded in one place.

Precedence: command-line flags > ``DUCKCELL_*`` environment > YAML file (``--config`` or
``DUCKCELL_CONFIG``) > defaults. Components receive the part they need and never read the
environment themselves.

The file is one flat mapping of the settings below, read with the shared YAML reader
(``launcher.yamlfile``): a mistake names the file, line and key (``c.yaml:3: max_sandboxes:
expected a whole number of at least 1, got 2.7``), sizes read like "10GiB" and durations like
"30s". Flags and environment variables are text and get the same checks.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .resources import policies_dir
from .yamlfile import Reader, parse_duration
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
    # (inside, engine) path prefixes for a launcher in a container (``EnginePaths``); empty:
    # the engine sees this process's paths. Set by `duckcell worker --host-paths`.
    engine_paths: tuple[tuple[str, str], ...] = ()

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
_DURATIONS = {"queue_timeout_s", "engine_timeout_s", "start_timeout_s", "kill_grace_s"}
_COUNTS = {"max_sandboxes", "max_parallel_starts"}
_PATHS = {"state_dir", "policies_dir", "cache_dir"}
_SCHEMA = {"": " ".join(_ENV)}  # the file's keys: the settings, one flat mapping


def parse_size(text: str) -> int:
    """``"10GiB"``, ``"500MB"``, ``"1.5 GiB"`` or plain bytes, as bytes.

    Raises ValueError saying what a size looks like.
    """
    size = size_or_none(text)
    if size is None:
        raise ValueError('expected a size like "10GiB", "500MB" or a number of bytes')
    return size


def _coerce(name: str, value: Any, origin: str) -> Any:
    """A flag's or an environment variable's value (text, or a typed value a caller passed)."""
    try:
        if isinstance(value, bool):
            raise ValueError("expected a value, got a boolean")
        if name in _SIZES:
            size = value if isinstance(value, int) else parse_size(str(value))
            if size < 1:
                raise ValueError("must be at least 1 byte")
            return size
        if name in _PATHS:
            return Path(str(value)).expanduser()
        if name in _COUNTS:
            text = str(value).strip()
            if not isinstance(value, int) and not (text.isascii() and text.isdigit()):
                raise ValueError("expected a whole number")
            number = int(value)
            if number < 1:
                raise ValueError("must be at least 1")
            return number
        if name in _DURATIONS:
            seconds = float(value) if isinstance(value, int | float) else parse_duration(str(value))
            if seconds is None or not math.isfinite(seconds):
                raise ValueError('expected a duration like "30s", "5m" or "250ms"')
            if seconds < 0.001:  # what the config file accepts too (yamlfile.Reader.duration)
                raise ValueError("must be at least 1ms")
            return seconds
        return str(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{origin}: {name}: invalid value {value!r} ({error})") from None


def _from_yaml(path: Path) -> dict[str, Any]:
    """The settings in a config file: a flat mapping read by the shared YAML reader, so every
    mistake is one ``ConfigError`` line naming file, line and key (``launcher.yamlfile``)."""
    try:
        text = path.read_bytes().decode()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML config file (not UTF-8 text)") from None
    reader = Reader(str(path), _SCHEMA, error=ConfigError, keys="settings")
    root = reader.compose_optional(text)
    if root is None or root.tag.endswith(":null"):  # empty, comments only, or a bare "---"
        return {}
    sec = reader.section(root, "", 1)
    values: dict[str, Any] = {}
    for name, node in sec.values.items():
        if name in _SIZES:
            values[name] = reader.size(node, name, 1)
        elif name in _COUNTS:
            values[name] = reader.integer(node, name, 1)
        elif name in _DURATIONS:
            values[name] = reader.duration(node, name)
        elif name == "cache_dir" and node.tag.endswith(":null"):
            values[name] = None  # written out empty: the default, STATE_DIR/cache
        elif name in _PATHS:
            if not reader.text(node, name):
                reader.fail(node, name, "expected a directory path, got an empty string")
            values[name] = Path(node.value).expanduser()
        elif name == "launcher_id" and node.tag.endswith(":int"):
            values[name] = node.value  # an id of digits, written without quotes
        else:
            values[name] = reader.text(node, name)
    return values


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
