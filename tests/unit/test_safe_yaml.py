"""Hostile YAML (alias bombs, deep nesting) is refused quickly with its place, never its text."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from quay_bootstrap import safe_yaml
from quay_bootstrap.config import DEFAULT_ALLOWED_TAGS
from quay_bootstrap.errors import EXIT_CONFIG, EXIT_LOCK, ConfigError, LockViolation
from quay_bootstrap.lock import resolve
from quay_bootstrap.stack.validate import check_stack


def laughs(levels: int = 9, secret: str = "R0tSuperSecret99") -> str:
    """The "billion laughs": 10 aliases per level, 10^levels values, about 330 bytes."""
    lines = [f'a0: &a0 ["{secret}"]']
    for n in range(1, levels + 1):
        lines.append(f"a{n}: &a{n} [" + ",".join([f"*a{n - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def chained_depth(links: int = 30, depth: int = 60) -> str:
    """Each anchor nests 60 levels and holds the previous one: 1,800 levels in 4 KB."""
    lines = ["l0: &l0 x"]
    for n in range(1, links):
        lines.append(f"l{n}: &l{n} " + "[" * depth + f"*l{n - 1}" + "]" * depth)
    return "\n".join(lines) + "\n"


def big_scalar_aliased(count: int = 20_000) -> str:
    """One 1 MB string aliased 20,000 times: a 1 MB file that is 20 GB of text."""
    return f"S: &s {'x' * 2**20}\nL: [" + ", ".join(["*s"] * count) + "]\n"


def nested(depth: int = 900) -> str:
    return "SECRET_KEY: " + "[" * depth + "]" * depth + "\n"


def test_a_small_alias_bomb_is_small():
    assert len(laughs()) < 500


@pytest.mark.parametrize("text,says", [
    (laughs(), "holds more than 100000 values"),
    ("A: &a [*a]\n", "an alias refers to a node that contains it"),
    ("A: &a {k: {<<: *a}}\n", "an alias refers to a node that contains it"),
    (chained_depth(), "levels deep (with aliases expanded)"),
    (big_scalar_aliased(), "MiB of text"),
    (nested(), "nested more than"),
    (nested(10_000), "line 1"),  # libyaml's own limit (1,000) comes first here
])
def test_bombs_and_deep_nesting_are_refused_within_a_second(text, says):
    started = time.monotonic()
    with pytest.raises(yaml.YAMLError) as caught:
        safe_yaml.load(text)
    assert time.monotonic() - started < 1
    where = safe_yaml.where(caught.value, text)
    assert says in where and where.startswith("line ")
    assert "R0tSuperSecret99" not in where


def test_ordinary_anchors_and_nesting_still_load():
    text = ("base: &base {host: db, port: 5432}\nprimary: *base\nreplica: *base\n"
            "deep: " + "[" * 40 + "1" + "]" * 40 + "\n")
    data = safe_yaml.load(text)
    assert data["primary"] == data["replica"] == {"host": "db", "port": 5432}


def test_only_safe_types_are_built():
    text = "run: !!python/object/apply:os.system ['true']\n"
    with pytest.raises(yaml.constructor.ConstructorError) as caught:
        safe_yaml.load(text)
    where = safe_yaml.where(caught.value, text)
    assert where.startswith("line 1, column 6") and "os.system" not in where


def test_the_key_named_is_the_last_key_read_never_a_wrapped_value():
    text = "DB_USER: quay\nDB_PASSWORD: Tr0ub4dor\n  Wr4pped-S3cret-Half: and more\n"
    with pytest.raises(yaml.YAMLError) as caught:
        safe_yaml.load(text)
    where = safe_yaml.where(caught.value, text)
    assert "(key DB_PASSWORD)" in where and "Wr4pped" not in where


def test_a_long_key_is_not_named():
    text = "k" * 5000 + ": [\n"
    with pytest.raises(yaml.YAMLError) as caught:
        safe_yaml.load(text)
    assert "kkk" not in safe_yaml.where(caught.value, text)


@pytest.mark.parametrize("text", [laughs(), nested()])
def test_the_agent_config_refuses_them_with_78(text):
    from quay_bootstrap.config import parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(text, "/etc/quay-bootstrap/config.yaml")
    assert caught.value.exit_code == EXIT_CONFIG
    assert "R0tSuperSecret99" not in str(caught.value) + str(caught.value.where)


@pytest.mark.parametrize("text", [laughs(), nested(), "A: &a [*a]\n", chained_depth(),
                                  big_scalar_aliased()])
def test_a_stacks_config_yaml_refuses_them(text):
    started = time.monotonic()
    check = check_stack(["config.yaml"], text.encode())
    assert time.monotonic() - started < 1
    (where, what), = check.errors
    assert where.startswith("config.yaml line ") and what == "is not valid YAML"
    assert "R0tSuperSecret99" not in where


@pytest.mark.parametrize("text", [laughs(), nested()])
def test_the_cluster_lock_refuses_them(text):
    # 65 like every other lock that cannot be used: the operator fixes the lock either way.
    with pytest.raises(LockViolation) as caught:
        resolve("quay.io/projectquay/quay:v3.9.0", DEFAULT_ALLOWED_TAGS, text.encode(),
                "s3://b/quay-lock.yaml")
    assert caught.value.exit_code == EXIT_LOCK and "line " in str(caught.value.where)


@pytest.mark.parametrize("text", [laughs(), nested(), "stack: &a [*a]\n", chained_depth()])
def test_validate_exits_78_within_a_second(tmp_path, text):
    config = tmp_path / "config.yaml"
    config.write_text(text)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "quay_bootstrap", "validate", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)
    # Interpreter start-up excluded: the parse itself is what must be quick.
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "R0tSuperSecret99" not in proc.stdout + proc.stderr
    assert time.monotonic() - started < 5
