"""No secret from conf/stack ever reaches the agent's output, whatever the command and log level."""
from __future__ import annotations

import pytest
import yaml

from tests.testbed.stacks import SECRETS, SSL_KEY, sample_stack

PRIVATE_KEY_BODY = SSL_KEY.splitlines()[1]


def outputs(agent, *args, log_format="json"):
    proc = agent.spawn(*args, log_level="debug", log_format=log_format)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out + err


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_every_command_at_debug_level_keeps_secrets_out(agent, s3_backend, log_format):
    s3_backend.upload(sample_stack())
    agent.write_config(s3_backend)
    seen = []
    runs = [
        ("fetch",),                                     # applies the stack
        ("fetch",),                                     # unchanged
        ("validate",),
        ("validate", "--stack", str(agent.stack_dir / "current")),
        ("version",),
    ]
    for args in runs:
        code, text = outputs(agent, *args, log_format=log_format)
        assert code == 0, text
        seen.append(text)
    # A stack that fails validation: its secrets must not leak through the error either.
    s3_backend.put("config.yaml", yaml.safe_dump({"DB_URI": f"mysql://u:{SECRETS['db']}@h/q",
                                                  "SECRET_KEY": SECRETS["secret_key"]}).encode())
    code, text = outputs(agent, "fetch", log_format=log_format)
    assert code == 78 and "SERVER_HOSTNAME: is missing" in text
    everything = "\n".join(seen + [text])
    assert "stack.applied" in everything  # debug output was really produced
    for name, value in SECRETS.items():
        assert value not in everything, f"the {name} secret leaked"
    assert PRIVATE_KEY_BODY not in everything
