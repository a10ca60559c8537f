"""The redaction processor and the two output formats."""
from __future__ import annotations

import io
import json

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
