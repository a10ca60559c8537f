"""The CLI's contract: fast start without cloud SDKs, exit statuses, validate without side effects."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from quay_bootstrap.cli import main
from quay_bootstrap.errors import EXIT_CONFIG, EXIT_OK, EXIT_USAGE


def run(*args):
    return subprocess.run([sys.executable, "-m", "quay_bootstrap", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args", [["--help"], ["version"]])
def test_help_and_version_do_not_load_cloud_sdks(args):
    code = ("import sys; from quay_bootstrap.cli import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('boto3', 'botocore', 'google.cloud.storage', 'docker', "
            "'pydantic') if m in sys.modules]\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "HEAVY []" in out


def test_help_lists_commands_and_exit_statuses():
    proc = run("--help")
    assert proc.returncode == 0
    for text in ("fetch", "validate", "version", "65", "69", "78"):
        assert text in proc.stdout


def test_version(capsys):
    assert main(["version"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("quay-bootstrap ")


def test_usage_error_is_2():
    proc = run("no-such-command")
    assert proc.returncode == EXIT_USAGE and "invalid choice" in proc.stderr


def test_invalid_config_is_78_with_every_problem(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stack: {source: s3://b/p, refresh_intervall: 5m}\nimage: {}\n")
    proc = run("--config", str(path), "validate")
    assert proc.returncode == EXIT_CONFIG
    assert "stack.refresh_intervall: unknown key; did you mean 'refresh_interval'?" in proc.stderr
    assert "image.reference: required key is missing" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_from_the_environment(tmp_path, monkeypatch, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"stack": {"source": "gs://b/conf/stack"},
                                    "image": {"reference": "quay.io/projectquay/quay:v3.9.0"}}))
    monkeypatch.setenv("QUAY_BOOTSTRAP_CONFIG", str(path))
    assert main(["validate"]) == EXIT_OK
    assert "config ok: stack from gs://b/conf/stack" in capsys.readouterr().out


def test_validate_a_local_stack_changes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QUAY_BOOTSTRAP_CONFIG", raising=False)
    stack = tmp_path / "stack"
    stack.mkdir()
    (stack / "config.yaml").write_text("PREFERRED_URL_SCHEME: https\nSERVER_HOSTNAME: q\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["validate", "--stack", str(stack)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "DB_URI: is missing; Quay's config-tool refuses to start without it" in err
    assert "ssl.cert: missing" in err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_validate_refuses_a_floating_tag_like_run_does(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stack: {source: s3://b/p}\nimage: {reference: quay.io/projectquay/quay:latest}\n")
    proc = run("--config", str(path), "validate")
    assert proc.returncode == 65 and "'latest'" in proc.stderr


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_config_problem_never_shows_the_secret_it_is_about(tmp_path, fmt):
    """pydantic's own text quotes every input value: at debug level the whole chain is logged."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "stack": {"source": "file:///srv/stack"},
        "image": {"reference": "quay.io/projectquay/quay:v3.9.0",
                  "auth": {"username": "u", "password": "InlineRegPw-7777"}},
        "container": {"env": {"DB_PASSWORD": {"v": "EnvNestedPw-8888"}}}}))
    proc = run("--config", str(config), "validate", "--log-level", "debug", "--log-format", fmt)
    assert proc.returncode == EXIT_CONFIG
    assert "image.auth.password" in proc.stdout + proc.stderr
    for secret in ("InlineRegPw-7777", "EnvNestedPw-8888"):
        assert secret not in proc.stdout + proc.stderr


@pytest.mark.parametrize("url, loaded, never", [
    ("s3://quay-conf/conf/stack", "botocore", "google.cloud.storage"),
    ("gs://quay-conf/conf/stack", "google.cloud.storage", "botocore"),
    ("file:///etc/quay/stack", None, "botocore"),
])
def test_a_node_loads_only_its_stores_sdk(url, loaded, never):
    """An S3 node never pays google-cloud-storage's import (36 MiB), nor a GCS node botocore's."""
    code = ("import json, sys\n"
            "import quay_bootstrap.daemon, quay_bootstrap.pipeline, quay_bootstrap.rollout\n"
            "import quay_bootstrap.run_once, quay_bootstrap.node, quay_bootstrap.cluster_view\n"
            "from quay_bootstrap import stores\n"
            f"stores.provider({url!r})\n"
            "print(json.dumps([m for m in ('botocore', 'boto3', 'google.cloud.storage') "
            "if m in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert never not in found and "boto3" not in found
    assert (loaded in found) if loaded else found == []
