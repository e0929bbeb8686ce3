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


# A config file of lines 1 to 3; the bad documents below append from line 4 or replace a line.
BASE = """\
image: duckcell-sandbox:latest
max_sandboxes: 4
queue_timeout_s: 30s
"""


def with_line(line: int, text: str) -> str:
    """BASE with one line (1-based) replaced."""
    lines = BASE.splitlines()
    lines[line - 1] = text
    return "\n".join(lines) + "\n"


# (id, document, line, key, message): every mistake is one line naming file, line and key.
BAD_FILES = [
    ("syntax", BASE + "image: [unclosed\n", 5, "", "invalid YAML"),
    ("tab", BASE + "\tmax_sandboxes: 2\n", 4, "", "'\\t'"),
    ("top-level-list", "- a\n- b\n", 1, "", "expected a mapping of settings, got a list"),
    ("top-level-scalar", "words\n", 1, "", 'expected a mapping of settings, got "words"'),
    ("unknown", with_line(2, "max_sandbox: 3"), 2, "max_sandbox", 'mean "max_sandboxes"?'),
    ("unknown-far", BASE + "colour: red\n", 4, "colour", "unknown key; expected launcher_id"),
    ("nested-section", BASE + "pool:\n  warm: 1\n", 4, "pool", "unknown key"),
    ("duplicate", BASE + "max_sandboxes: 5\n", 4, "max_sandboxes", "first on line 2"),
    ("merge-key", BASE + "<<: {image: x}\n", 4, "", 'merge key "<<"'),
    ("count-float", with_line(2, "max_sandboxes: 2.7"), 2, "max_sandboxes", "a whole number"),
    ("count-zero", with_line(2, "max_sandboxes: 0"), 2, "max_sandboxes", "of at least 1, got 0"),
    ("count-word", with_line(2, "max_sandboxes: zero"), 2, "max_sandboxes", 'got "zero"'),
    ("count-quoted", with_line(2, "max_sandboxes: '2'"), 2, "max_sandboxes", "remove the quotes"),
    ("count-bool", with_line(2, "max_sandboxes: true"), 2, "max_sandboxes", "got true"),
    ("count-null", with_line(2, "max_sandboxes:"), 2, "max_sandboxes", "got null"),
    ("starts-list", BASE + "max_parallel_starts: [2]\n", 4, "max_parallel_starts", "a list"),
    ("duration-word", with_line(3, "queue_timeout_s: soon"), 3, "queue_timeout_s", "a duration"),
    ("duration-zero", with_line(3, "queue_timeout_s: 0"), 3, "queue_timeout_s", "at least 1ms"),
    ("duration-negative", BASE + "kill_grace_s: -1\n", 4, "kill_grace_s", "at least 1ms"),
    ("duration-bool", BASE + "engine_timeout_s: yes\n", 4, "engine_timeout_s", "a duration"),
    ("size-word", BASE + "cache_budget_bytes: lots\n", 4, "cache_budget_bytes", "a size like"),
    ("size-bool", BASE + "cache_budget_bytes: true\n", 4, "cache_budget_bytes", "got true"),
    ("size-float", BASE + "cache_budget_bytes: 1.5\n", 4, "cache_budget_bytes", "got 1.5"),
    ("size-zero", BASE + "cache_budget_bytes: 0GiB\n", 4, "cache_budget_bytes", "at least 1"),
    ("image-number", with_line(1, "image: 5"), 1, "image", "expected a string, got 5"),
    ("image-list", with_line(1, "image: [a]"), 1, "image", "expected a string, got a list"),
    ("id-null", BASE + "launcher_id:\n", 4, "launcher_id", "expected a string, got null"),
    ("state-dir-number", BASE + "state_dir: 1\n", 4, "state_dir", "expected a string"),
    ("state-dir-empty", BASE + "state_dir: ''\n", 4, "state_dir", "got an empty string"),
    ("state-dir-null", BASE + "state_dir:\n", 4, "state_dir", "got null"),
    ("tagged", with_line(2, "max_sandboxes: !env N"), 2, "max_sandboxes", "got the tag !env"),
]


@pytest.mark.parametrize(
    ("text", "line", "key", "message"),
    [case[1:] for case in BAD_FILES],
    ids=[case[0] for case in BAD_FILES],
)
def test_bad_config_files_name_file_line_and_key(
    tmp_path: Path, text: str, line: int, key: str, message: str
) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(env={}, config_file=config_file)
    error = str(caught.value)
    prefix = f"{config_file}:{line}: " + (f"{key}: " if key else "")
    assert error.startswith(prefix), error
    assert message in error, error
    assert "\n" not in error


# (id, document, setting, value): what a good file's values become.
GOOD_FILES = [
    ("empty", "", "max_sandboxes", 8),
    ("comments-only", "# nothing set here\n", "queue_timeout_s", 30.0),
    ("document-marker-only", "---\n# max_sandboxes: 4\n", "max_sandboxes", 8),
    ("duration-leading-dot", "kill_grace_s: .5s\n", "kill_grace_s", 0.5),
    ("numeric-launcher-id", "launcher_id: 12345\n", "launcher_id", "12345"),
    ("count", "max_sandboxes: 3\n", "max_sandboxes", 3),
    ("duration-seconds", "queue_timeout_s: 9\n", "queue_timeout_s", 9.0),
    ("duration-fraction", "kill_grace_s: 0.5\n", "kill_grace_s", 0.5),
    ("duration-unit", "start_timeout_s: 2m\n", "start_timeout_s", 120.0),
    ("duration-ms", "engine_timeout_s: 250ms\n", "engine_timeout_s", 0.25),
    ("size-unit", "cache_budget_bytes: 2GiB\n", "cache_budget_bytes", 2 * 2**30),
    ("size-bytes", "cache_budget_bytes: 4096\n", "cache_budget_bytes", 4096),
    ("image", "image: mine:1\n", "image", "mine:1"),
    ("cache-dir-null", "cache_dir:\n", "cache_dir", None),
    ("cache-dir", "cache_dir: /srv/cache\n", "cache_dir", Path("/srv/cache")),
]


@pytest.mark.parametrize(
    ("text", "setting", "value"),
    [case[1:] for case in GOOD_FILES],
    ids=[case[0] for case in GOOD_FILES],
)
def test_good_config_files(tmp_path: Path, text: str, setting: str, value: object) -> None:
    config_file = tmp_path / "c.yaml"
    config_file.write_text(text)
    config = load_config(env={}, config_file=config_file)
    assert getattr(config, setting) == value


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DUCKCELL_MAX_SANDBOXES": "2.7"}, "expected a whole number"),
        ({"DUCKCELL_MAX_SANDBOXES": "0"}, "must be at least 1"),
        ({"DUCKCELL_QUEUE_TIMEOUT": "soon"}, "expected a duration"),
        ({"DUCKCELL_QUEUE_TIMEOUT": "0s"}, "must be at least 1ms"),
        ({"DUCKCELL_QUEUE_TIMEOUT": "0.0001"}, "must be at least 1ms"),
        ({"DUCKCELL_KILL_GRACE": "nan"}, "expected a duration"),
    ],
)
def test_bad_env_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(env=env)
    assert f"environment {next(iter(env))}:" in str(caught.value)
    assert message in str(caught.value)


def test_env_durations_take_units() -> None:
    config = load_config(env={"DUCKCELL_QUEUE_TIMEOUT": "2m", "DUCKCELL_KILL_GRACE": "1.5"})
    assert (config.queue_timeout_s, config.kill_grace_s) == (120.0, 1.5)
    assert load_config(env={"DUCKCELL_KILL_GRACE": ".5"}).kill_grace_s == 0.5


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
