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


def test_cache_budget_default_is_10_gib_and_cache_root_is_under_state(tmp_path: Path) -> None:
    config = load_config(flags={"state_dir": tmp_path}, env={})
    assert config.cache_budget_bytes == 10 * 2**30
    assert config.cache_root == tmp_path / "cache"
    moved = load_config(flags={"state_dir": tmp_path, "cache_dir": tmp_path / "c"}, env={})
    assert moved.cache_root == tmp_path / "c"


def test_cache_budget_sizes_from_flag_env_and_file(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("cache_budget_bytes: 2GiB\n")
    assert load_config(env={}, config_file=config_file).cache_budget_bytes == 2 * 2**30
    env = {"DUCKCELL_CACHE_BUDGET": "500MB"}
    assert load_config(env=env, config_file=config_file).cache_budget_bytes == 500 * 10**6
    flags = {"cache_budget_bytes": "1.5 KiB"}
    assert load_config(flags=flags, env=env, config_file=config_file).cache_budget_bytes == 1536
    config_file.write_text("cache_budget_bytes: 4096\n")
    assert load_config(env={}, config_file=config_file).cache_budget_bytes == 4096


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"cache_budget_bytes": "lots"}, {}, "--cache-budget: cache_budget_bytes: invalid value"),
        ({}, {"DUCKCELL_CACHE_BUDGET": "10 parsecs"}, "DUCKCELL_CACHE_BUDGET"),
        ({"cache_budget_bytes": "0GiB"}, {}, "must be at least 1 byte"),
    ],
)
def test_bad_cache_budget_says_what_a_size_looks_like(
    flags: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(flags=flags, env=env)
    assert message in str(caught.value)
    if "at least" not in message:
        assert 'expected a size like "10GiB"' in str(caught.value)


def test_cache_budget_in_yaml_rejects_a_boolean(tmp_path: Path) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text("cache_budget_bytes: true\n")
    with pytest.raises(ConfigError, match="cache_budget_bytes"):
        load_config(env={}, config_file=config_file)
