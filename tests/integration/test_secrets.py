"""No secret ever reaches the agent's output: a catalogue of hostile placements, every command at
debug level, every output searched (stdout, stderr, /status, /metrics, `status --json`, the state
file, what is logged of on_unhealthy); and the same run with redaction turned off must leak."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from tests.integration.conftest import BACKOFF, Daemon, wait_for
from tests.testbed.stacks import SECRETS, SSL_KEY, sample_stack

# Each value is unique, so a leak names its placement.
CATALOGUE = {
    # Quay's config.yaml in conf/stack (sample_stack's own, and more).
    "stack DB_URI password": SECRETS["db"],
    "stack SECRET_KEY": SECRETS["secret_key"],
    "stack DATABASE_SECRET_KEY": SECRETS["database_secret_key"],
    "stack BUILDLOGS_REDIS.password": SECRETS["redis"],
    "stack S3 access key in a list": SECRETS["s3_access"],
    "stack S3 secret key in a list": SECRETS["s3_secret"],
    "stack LDAP_ADMIN_PASSWD": SECRETS["ldap"],
    "stack SECURITY_SCANNER_V4_PSK": SECRETS["psk"],
    "stack GITHUB_LOGIN_CONFIG.CLIENT_SECRET": SECRETS["client_secret"],
    "stack BITTORRENT_FILENAME_PEPPER": "PepperValue-6b6c",
    "stack MAIL_PASSWORD": "MailPassw0rd-1e2f",
    "stack numeric password": "987654321012",
    "stack secret in a nested list": "NestedListToken-77aa",
    "stack redis URL password": "RedisUrlPw-4455",
    "stack ssl.key body": SSL_KEY.splitlines()[1],
    # The agent config.
    "container.env password": "ContainerEnvPw-8d8d",
    "on_unhealthy Authorization header": "BearerTok-0a0b0c0d",
    "on_unhealthy curl -u password": "CurlUserPw-5f5f",
    "on_unhealthy webhook query token": "WebhookQueryTok-3c3c",
    "on_unhealthy webhook path token": "SlackPathTok-9e9e",
    "registry password file": "RegistryPw-2d2d",
    # The environment (the unit's EnvironmentFile).
    "env AWS_ACCESS_KEY_ID": "AKIACATALOGUE0KEYID",
    "env AWS_SECRET_ACCESS_KEY": "AwsSecretKey-wJalrXUtnFEMI-cat",
    "env AWS_SESSION_TOKEN": "AwsSessionTok-FwoGZXIv-cat",
    "env a secret-named variable": "EnvWebhookTok-6a6a",
    # Documents that do not parse: YAML would quote them in its error.
    "malformed stack config.yaml alias": "R0tSuperSecret99",
    "malformed agent config alias": "AgentConfAlias77",
    "agent config that fails validation": "InlineRegPw-7777",
    "malformed lock alias": "LockAliasSecret55",
}

ENV = {"AWS_ACCESS_KEY_ID": CATALOGUE["env AWS_ACCESS_KEY_ID"],
       "AWS_SECRET_ACCESS_KEY": CATALOGUE["env AWS_SECRET_ACCESS_KEY"],
       "AWS_SESSION_TOKEN": CATALOGUE["env AWS_SESSION_TOKEN"],
       "QUAY_ALERTS_WEBHOOK_TOKEN": CATALOGUE["env a secret-named variable"]}

# The on_unhealthy command: it prints its arguments and every secret-looking variable it got, as
# a careless script would, and records its environment's names for the test.
HOOK = textwrap.dedent("""\
    import os, sys
    print("args", sys.argv[1:])
    print({k: v for k, v in os.environ.items() if k.startswith(("AWS", "QUAY_ALERTS"))})
    open(os.environ["HOOK_RECORD"], "a").write(" ".join(sorted(os.environ)) + "\\n")
    """)

NO_REDACTION = """\
from quay_bootstrap import logs
logs.Redactor.redact = lambda self, value, key="": value
logs.Redactor.redact_text = lambda self, text: text
"""


def hostile_stack() -> dict:
    files = sample_stack(
        BITTORRENT_FILENAME_PEPPER=CATALOGUE["stack BITTORRENT_FILENAME_PEPPER"],
        MAIL_PASSWORD=CATALOGUE["stack MAIL_PASSWORD"],
        REDIS_PASSWORD=int(CATALOGUE["stack numeric password"]),
        OAUTH_EXTRA={"tokens": [{"name": "ci", "token": CATALOGUE["stack secret in a nested list"]}]},
        EVENTS_REDIS_URL=f"redis://:{CATALOGUE['stack redis URL password']}@127.0.0.1:6379/0")
    return files


def hook_argv(record: Path) -> list:
    return [sys.executable, "-c", HOOK.replace('os.environ["HOOK_RECORD"]', repr(str(record))),
            "-H", f"Authorization: Bearer {CATALOGUE['on_unhealthy Authorization header']}",
            "-u", f"ops:{CATALOGUE['on_unhealthy curl -u password']}",
            f"https://hooks.example.net/notify?token={CATALOGUE['on_unhealthy webhook query token']}",
            f"https://hooks.example.net/services/T0/B0/{CATALOGUE['on_unhealthy webhook path token']}"]


class Outputs:
    """Everything the agent printed or served, by where it was seen."""

    def __init__(self, agent, extra_env):
        self.agent, self.extra_env, self.seen = agent, extra_env, []

    def run(self, *args, expect=0, config=None):
        env = {**os.environ, **self.agent.env, **self.extra_env}
        argv = [sys.executable, "-m", "quay_bootstrap", "--config",
                str(config or self.agent.config_path), *args, "--log-level", "debug"]
        for fmt in ("json", "console") if args[0] in ("fetch", "validate") else ("json",):
            done = subprocess.run([*argv, "--log-format", fmt], capture_output=True, text=True,
                                  env=env, timeout=120)
            self.add(f"{' '.join(args)} ({fmt})", done.stdout + done.stderr)
            assert done.returncode == expect, done.stdout + done.stderr[-3000:]

    def add(self, where, text):
        self.seen.append((where, text))

    def leaks(self):
        return {name: [where for where, text in self.seen if value in text]
                for name, value in CATALOGUE.items()
                if any(value in text for _, text in self.seen)}


def exercise(node, tmp_path, extra_env) -> Outputs:
    agent = node.agent
    node.backend.upload(hostile_stack())
    record = tmp_path / "hook-env"
    password = tmp_path / "registry-password"
    password.write_text(CATALOGUE["registry password file"] + "\n")
    password.chmod(0o600)
    node.configure(
        image={"auth": {"username": "puller", "password_file": str(password)}},
        container={"env": {"QUAY_DB_PASSWORD": CATALOGUE["container.env password"]}},
        health={"interval": "0.5s", "timeout": "1s", "failure_threshold": 2,
                "start_period": "3s"},
        restart={**BACKOFF, "unhealthy_after": 1},
        report={"on_unhealthy": hook_argv(record)})
    agent.env.update(ENV)
    out = Outputs(agent, extra_env)

    out.run("validate")
    out.run("fetch")
    out.run("fetch")  # unchanged
    out.run("validate", "--stack", str(agent.stack_dir / "current"))
    out.run("prefetch-image")
    out.run("run", "--once")

    # The daemon: healthy, then failing until on_unhealthy runs.
    daemon = Daemon(node, extra_env)
    try:
        daemon.wait_state("healthy", timeout=30)
        out.add("/status healthy", daemon.get("/status")[1].decode())
        out.add("/metrics healthy", daemon.get("/metrics")[1].decode())
        out.run("status")  # from the endpoint
        node.state("fail web_gunicorn")
        wait_for(lambda: record.exists() and '"on_unhealthy.ran"' in daemon.log, 40,
                 "on_unhealthy to run; log:\n" + daemon.log[-3000:])
        out.add("/status failing", daemon.get("/status")[1].decode())
        out.add("/metrics failing", daemon.get("/metrics")[1].decode())
        out.add("state file", Path(node.report["state_file"]).read_text())
        out.run("status", "--json")
        node.state("healthy")
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.proc.wait(timeout=30)
        out.add("daemon log", daemon.log)
    out.run("status", "--json")  # from the state file

    # Documents that do not parse, each quoting a secret in YAML's own error.
    node.backend.put("config.yaml", (
        "SERVER_HOSTNAME: quay.example.com\n"
        f"SECRET_KEY: *{CATALOGUE['malformed stack config.yaml alias']}\n").encode())
    out.run("fetch", expect=78)
    out.run("run", "--once", expect=78)
    bad_config = tmp_path / "bad-agent.yaml"
    bad_config.write_text(agent.config_path.read_text().replace(
        "retry_deadline:", f"token: *{CATALOGUE['malformed agent config alias']}\n  retry_deadline:"))
    out.run("validate", expect=78, config=bad_config)
    invalid = yaml.safe_load(agent.config_path.read_text())
    invalid["image"]["auth"]["password"] = CATALOGUE["agent config that fails validation"]
    bad_config.write_text(yaml.safe_dump(invalid))  # pydantic's own text quotes the value
    out.run("validate", expect=78, config=bad_config)
    node.backend.upload(hostile_stack())
    node.backend.put("quay-lock.yaml", f"reference: *{CATALOGUE['malformed lock alias']}\n".encode())
    config = yaml.safe_load(agent.config_path.read_text())
    config["image"]["lock"] = node.backend.url + "/quay-lock.yaml"
    locked = tmp_path / "locked-agent.yaml"
    locked.write_text(yaml.safe_dump(config))
    out.run("prefetch-image", expect=65, config=locked)
    out.run("version")
    out.record = record
    return out


def test_no_placement_of_a_secret_reaches_any_output(node, tmp_path):
    out = exercise(node, tmp_path, {})
    assert len(CATALOGUE) >= 25
    everything = "\n".join(text for _, text in out.seen)
    assert '"stack.applied"' in everything and '"on_unhealthy.ran"' in everything  # debug output
    assert out.leaks() == {}
    # The command got only what it needs: not the agent's AWS keys or tokens.
    names = out.record.read_text().split()
    assert "QUAY_BOOTSTRAP_REASON" in names and "PATH" in names
    assert not [n for n in names if n.startswith("AWS") or n == "QUAY_ALERTS_WEBHOOK_TOKEN"]


def test_the_catalogue_finds_leaks_when_redaction_is_off(node, tmp_path):
    """The search above can fail: without the redactor, most placements leak."""
    patch = tmp_path / "no-redaction"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(NO_REDACTION)
    out = exercise(node, tmp_path, {"PYTHONPATH": str(patch)})
    leaked = out.leaks()
    assert len(leaked) >= 15, sorted(leaked)
