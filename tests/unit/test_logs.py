"""The redaction processor and the two output formats."""
from __future__ import annotations

import io
import json
import sys

import pytest
import structlog

from quay_bootstrap import logs


def render(redactor, fmt="json", **event):
    stream = io.StringIO()
    logs.configure(redactor, level="debug", fmt=fmt, stream=stream)
    structlog.get_logger("test").info("thing.happened", **event)
    return stream.getvalue()


def test_secret_keys_urls_presigned_queries_and_pem_are_masked():
    redactor = logs.Redactor()
    redactor.add(["TopSecretValue", "ab"])  # too-short values are not masked (too noisy)
    line = json.loads(render(
        redactor,
        password="hunter2", db_uri="postgresql://quay:DbPw99@db/quay",
        url="https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=deadbeef",
        gcs="https://storage.googleapis.com/b/o?X-Goog-Signature=cafe&X-Goog-Date=1",
        note="the value TopSecretValue appeared in text; ab stays",
        pem="-----BEGIN RSA PRIVATE KEY-----\nMIIsecret\n-----END RSA PRIVATE KEY-----",
        nested={"registry": {"password": "pw", "username": "bob"}},
        s3_secret_key="x", version="v3.9.0"))
    assert line["password"] == "***"
    assert line["db_uri"] == "postgresql://quay:***@db/quay"
    assert line["url"] == "https://b.s3.amazonaws.com/k?***"
    assert line["gcs"] == "https://storage.googleapis.com/b/o?***"
    assert line["note"] == "the value *** appeared in text; ab stays"
    assert "MIIsecret" not in line["pem"]
    assert line["nested"] == {"registry": {"password": "***", "username": "bob"}}
    assert line["s3_secret_key"] == "***"
    assert line["version"] == "v3.9.0" and line["event"] == "thing.happened"


def test_exceptions_are_redacted_too():
    redactor = logs.Redactor()
    redactor.add(["LeakyPassword1"])
    stream = io.StringIO()
    logs.configure(redactor, level="debug", fmt="json", stream=stream)
    try:
        raise RuntimeError("login failed for LeakyPassword1")
    except RuntimeError:
        structlog.get_logger("test").exception("boom")
    assert "LeakyPassword1" not in stream.getvalue() and "***" in stream.getvalue()


def test_console_format_for_people():
    out = render(logs.Redactor(), fmt="console", version="abc")
    assert "thing.happened" in out and "version=abc" in out and not out.startswith("{")


def test_sdk_loggers_stay_quiet_at_debug():
    import logging

    logs.configure(logs.Redactor(), level="debug", fmt="json", stream=io.StringIO())
    assert logging.getLogger("botocore").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("quay_bootstrap").getEffectiveLevel() == logging.DEBUG


def test_lists_sets_bytes_and_objects_are_redacted():
    redactor = logs.Redactor()
    redactor.add(["RegistryPw-42"])

    class Opaque:
        def __str__(self):
            return "Opaque(password=RegistryPw-42)"

    line = json.loads(render(
        redactor,
        items=["ok", "RegistryPw-42"], tags={"RegistryPw-42"}, raw=b"body RegistryPw-42 end",
        thing=Opaque(), count=3, ratio=0.5, flag=True))
    assert line["items"] == ["ok", "***"] and line["tags"] == ["***"]
    assert line["raw"] == "body *** end" and "RegistryPw-42" not in line["thing"]
    assert (line["count"], line["ratio"], line["flag"]) == (3, 0.5, True)


def test_an_argv_keeps_its_shape_but_not_its_credentials():
    argv = ["curl", "-fsS", "-H", "Authorization: Bearer eyJhbGciOi.sig", "-u", "ops:OpsPw123",
            "--user=ops:OpsPw123", "--oauth2-bearer", "tok-123456",
            "https://hooks.example.net/notify?token=WebhookTok9&channel=ops",
            "https://u:UrlPw777@lb.example.net/deregister"]
    line = json.loads(render(logs.Redactor(), command=argv))["command"]
    text = json.dumps(line)
    for secret in ("eyJhbGciOi", "OpsPw123", "tok-123456", "WebhookTok9", "UrlPw777"):
        assert secret not in text
    assert line[:3] == ["curl", "-fsS", "-H"] and "channel=ops" in line[9]


def test_environment_secrets_are_registered_but_not_short_flags():
    redactor = logs.Redactor()
    redactor.add_environ({"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE",
                          "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                          "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLETOKEN",
                          "FEATURE_TOKEN_AUTH": "true", "HOME": "/root"})
    text = redactor.redact_text("AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY "
                                "FwoGZXIvYXdzEXAMPLETOKEN true /root")
    assert text == "*** *** *** true /root"


def test_quays_secret_names_are_secret():
    for name in ("BITTORRENT_FILENAME_PEPPER", "DATABASE_SECRET_KEY", "SECURITY_SCANNER_V4_PSK",
                 "LDAP_ADMIN_PASSWD", "MAIL_PASSWORD", "CLIENT_SECRET", "access_key", "api_key",
                 "Authorization", "cookie"):
        assert logs.SECRET_NAME.search(name), name
    for name in ("SERVER_HOSTNAME", "DB_CONNECTION_ARGS", "FEATURE_BUILD_SUPPORT", "version"):
        assert not logs.SECRET_NAME.search(name), name


def test_the_agents_own_messages_about_secret_keys_stay_readable():
    assert logs.Redactor().redact_text("DATABASE_SECRET_KEY: is missing") == \
        "DATABASE_SECRET_KEY: is missing"


def test_the_on_unhealthy_command_gets_a_minimal_environment_and_is_logged_by_name(tmp_path):
    from quay_bootstrap.escalation import CommandTarget

    stream = io.StringIO()
    logs.configure(logs.Redactor(), level="debug", fmt="json", stream=stream)
    dump = tmp_path / "env"
    target = CommandTarget(["sh", "-c", f"env > {dump}", "https://hooks.example.net/T0/SlackTok"],
                           environ={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",
                                    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI", "DOCKER_HOST": "x",
                                    "HTTPS_PROXY": "http://proxy:3128"})
    assert target.mark("health: 3 failures")
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["QUAY_BOOTSTRAP_REASON"] == "health: 3 failures"
    assert env["HTTPS_PROXY"] == "http://proxy:3128" and env["LANG"] == "C.UTF-8"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "DOCKER_HOST" not in env
    logged = stream.getvalue()
    assert '"program": "sh"' in logged and "SlackTok" not in logged


def test_more_shapes_of_credentials():
    redactor = logs.Redactor()
    redactor.add(["KeyAsSecret-99"])
    assert redactor.redact({"KeyAsSecret-99": 1}) == {"***": 1}
    assert redactor.redact(["curl", "-uops:OpsPw"]) == ["curl", "-u***"]
    text = redactor.redact_text(
        'password="two words" https://ghp_abcdefghijklmnop1234@github.com/x ssh://git@host/x '
        "AKIAIOSFODNN7EXAMPLE postgresql://quay:p@ss@word@db:5432/quay")
    for secret in ("two words", "ghp_", "AKIAIOSFODNN7EXAMPLE", "ss@word"):
        assert secret not in text
    assert "ssh://git@host/x" in text and "@db:5432/quay" in text


def test_on_unhealthy_output_is_masked_before_it_is_cut(tmp_path):
    """A secret that straddles the 2,000-character cut would match no more after it."""
    from quay_bootstrap.escalation import CommandTarget

    stream = io.StringIO()
    redactor = logs.Redactor()
    secret = "WebhookTok-ABCDEFGH-0123456789"
    redactor.add([secret])
    logs.configure(redactor, level="debug", fmt="json", stream=stream)
    script = f"print('{secret}' + 'x' * 1990)"
    assert CommandTarget([sys.executable, "-c", script], redact=redactor.redact_text).mark("why")
    output = json.loads(stream.getvalue().splitlines()[-1])["output"]
    assert "123456789" not in output and output.startswith("***x") and len(output) <= 2000


def test_what_a_command_prints_is_redacted(capsys, tmp_path):
    from quay_bootstrap.cli import main

    config = tmp_path / "config.yaml"
    config.write_text("stack: {source: 'file:///srv/stack', dir: /tmp/x}\n"
                      "image: {reference: 'quay.io/projectquay/quay:v3.9.0'}\n"
                      "container: {env: {QUAY_DB_PASSWORD: PrintedPw-5678}}\n")
    assert main(["--config", str(config), "validate"]) == 0
    # `validate` prints the config's source; the secret is registered, so nothing may show it,
    # and sys.stdout is given back afterwards.
    out = capsys.readouterr().out
    assert "config ok" in out and "PrintedPw-5678" not in out
    assert not isinstance(sys.stdout, logs.RedactedStream)


def test_systemd_status_lines_are_redacted(monkeypatch):
    from quay_bootstrap.status import Systemd

    sent = []
    fake = type(sys)("systemd.daemon")
    fake.notify = sent.append
    monkeypatch.setitem(sys.modules, "systemd.daemon", fake)
    monkeypatch.setitem(sys.modules, "systemd", type(sys)("systemd"))
    sys.modules["systemd"].daemon = fake
    redactor = logs.Redactor()
    redactor.add(["ProbeSecret-42"])
    Systemd({"NOTIFY_SOCKET": "/run/x"}, redact=redactor.redact_text).notify(
        "STATUS=failing: ProbeSecret-42", "WATCHDOG=1")
    assert sent == ["STATUS=failing: ***\nWATCHDOG=1"]


@pytest.mark.parametrize("value, expected", [
    # A weak (short) secret inside a longer word stays readable: names, images, hosts.
    ("quay-demo", "quay-demo"),
    ("started container quay-demo", "started container quay-demo"),
    ("quay.io/org/demo-image:v1", "quay.io/org/demo-image:v1"),
    ("demo.example.com", "demo.example.com"),
    ("demos demo_db", "demos demo_db"),
    # Where it stands as a value, it is masked.
    ("demo", "***"),
    ("password=demo", "password=***"),
    ("DB_PASS=demo&mode=x", "DB_PASS=***&mode=x"),
    ("https://user:demo@host", "https://user:***@host"),
    ("curl -u ops:demo https://x", "curl -u ops:*** https://x"),
    ('{"pw": "demo"}', '{"pw": "***"}'),
    ("login failed for demo.", "login failed for ***."),
    # A strong (8+) secret is masked even inside a word.
    ("quay-LongSecret99-x", "quay-***-x"),
])
def test_a_weak_secret_is_masked_only_where_it_stands_as_a_value(value, expected):
    redactor = logs.Redactor()
    redactor.add(["demo", "LongSecret99"])
    assert redactor.redact_text(value) == expected


@pytest.mark.parametrize("event, expected", [
    ({"field": "demo"}, {"field": "***"}),
    ({"container": "quay-demo"}, {"container": "quay-demo"}),
    ({"argv": ["run", "demo", "quay-demo"]}, {"argv": ["run", "***", "quay-demo"]}),
])
def test_a_weak_secret_as_a_whole_field_is_masked(event, expected):
    redactor = logs.Redactor()
    redactor.add(["demo"])
    assert redactor.redact(event) == expected


def test_a_weak_secret_is_warned_about_once_and_never_shown():
    redactor = logs.Redactor()
    stream = io.StringIO()
    logs.configure(redactor, level="debug", fmt="json", stream=stream)
    redactor.add(["demo", "LongSecret99"])
    redactor.add(["demo"])  # registered again, on the next pass: no second warning
    redactor.add(["longer"])  # a word of the warning's hint: the hint is left out
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    weak = [line for line in lines if line["event"] == "secrets.weak"]
    assert [(line["level"], line["length"], line["minimum"]) for line in weak] == \
        [("warning", 4, 8), ("warning", 6, 8)]
    assert "hint" in weak[0] and "hint" not in weak[1]
    assert "demo" not in stream.getvalue() and "LongSecret99" not in stream.getvalue()
    assert "longer" not in json.dumps(weak[1])
