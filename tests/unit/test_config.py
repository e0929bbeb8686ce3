from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import load_config
from launcher.errors import ConfigError


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    config_file = tmp_path / "launcher.yaml"
    config_file.write_text("image: from-file\nmax_sandboxes: 3\nqueue_timeout_s: 9\n")
    env = {"DUCKCELL_IMAGE": "from-env", "DUCKCELL_MAX_SANDBOXES": "5"}
    config = load_config(flags={"image": "from-flag"}, env=env, config_file=config_file)
    assert config.image == "from-flag"
    assert config.max_sandboxes == 5
    assert config.queue_timeout_s == 9.0
    assert config.kill_grace_s == 5.0


def test_config_file_from_env(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"state_dir: {tmp_path}/state\n")
    config = load_config(env={"DUCKCELL_CONFIG": str(config_file)})
    assert config.state_dir == tmp_path / "state"
    assert config.run_dir == tmp_path / "state" / "run"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_sandbox: 3\n", "unknown settings ['max_sandbox']"),
        ("max_sandboxes: zero\n", "max_sandboxes: invalid value 'zero'"),
        ("max_sandboxes: 0\n", "must be at least 1"),
        ("- a\n- b\n", "must be a mapping"),
        ("image: [unclosed\n", "c.yaml:2: invalid YAML"),
    ],
)
def test_bad_config_files(tmp_path: Path, text: str, message: str) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, config_file=config_file)
    assert message in str(caught.value)


def test_bad_env_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="DUCKCELL_QUEUE_TIMEOUT"):
        load_config(env={"DUCKCELL_QUEUE_TIMEOUT": "soon"})
