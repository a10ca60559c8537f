"""The hostile inputs of the security issue, through `run --once` on a node that already runs a
healthy Quay: each is refused with a clear error (what, where, what to do) that shows no secret,
and nothing is lost: the live stack is byte for byte the same and Quay's container untouched."""
from __future__ import annotations

import pytest
import yaml

from tests.integration.test_run_once import healthy_run
from tests.unit.test_safe_yaml import big_scalar_aliased, chained_depth, laughs, nested

SECRET = "R0tSuperSecret99"


def snapshot(node):
    container = node.found()
    return node.agent.live(), container.id, container.attrs["State"]["StartedAt"]


def assert_nothing_lost(node, before):
    container = node.found()
    assert node.agent.live() == before[0]  # the same version, every file the same
    assert (container.id, container.attrs["State"]["StartedAt"]) == before[1:]
    assert container.status == "running"
    assert node.agent.staging() == []


def put_beside_the_stack(node, s3, key, data: bytes) -> str:
    """An object next to the stack (not in it: it would be a new stack version)."""
    bucket = node.backend.url.split("/")[2]
    s3.put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


@pytest.mark.parametrize("config_yaml,says", [
    (f"SERVER_HOSTNAME: quay.example.com\nSECRET_KEY: *{SECRET}\n", "an alias names no anchor"),
    (laughs(secret=SECRET), "holds more than 100000 values"),
    (nested(), "levels deep"),
    (chained_depth(), "with aliases expanded"),
    (big_scalar_aliased(2_000), "MiB of text"),
    ("SERVER_HOSTNAME: quay.example.com\nA: &a [*a]\n", "contains it"),
])
def test_a_hostile_config_yaml_in_the_stack_is_refused_and_quay_keeps_running(node, config_yaml,
                                                                              says):
    healthy_run(node)
    before = snapshot(node)
    node.backend.put("config.yaml", config_yaml.encode())
    code, out, err = node.agent.run("run", "--once")
    assert code == 78, out + err[-2000:]
    assert "config.yaml line " in err and says in err and "is not valid YAML" in err
    assert SECRET not in out + err
    assert_nothing_lost(node, before)


@pytest.mark.parametrize("lock,code,says", [
    ("reference: attacker.example.net/x/quay:v3.9.0\n", 65, "attacker.example.net/x/quay"),
    (f"reference: *{SECRET}\n", 65, "not valid YAML"),
    (laughs(secret=SECRET), 65, "holds more than 100000 values"),
])
def test_a_hostile_cluster_lock_is_refused_and_quay_keeps_running(node, s3, lock, code, says):
    healthy_run(node)
    before = snapshot(node)
    node.configure(image={"lock": put_beside_the_stack(node, s3, "quay-lock.yaml", lock.encode())})
    got, out, err = node.agent.run("run", "--once")
    assert got == code, out + err[-2000:]
    assert says in err and "quay-lock.yaml" in err and SECRET not in out + err
    assert_nothing_lost(node, before)


def mutated(change):
    """An edit of the agent config's text: CHANGE applied to it as YAML."""
    def edit(text):
        config = yaml.safe_load(text)
        change(config)
        return yaml.safe_dump(config)
    return edit


@pytest.mark.parametrize("edit,code,says", [
    (lambda text: text + laughs(secret=SECRET), 78, "holds more than 100000 values"),
    (mutated(lambda c: c["health"].update(timeout="400d")), 78, "longer than a year"),
    (mutated(lambda c: c["health"].update(url="http://127.0.0.1:0/health/instance")), 78,
     "port 0"),
    (mutated(lambda c: c["report"].update(listen=":9101")), 78, "explicit host"),
    (mutated(lambda c: c["report"].update(listen="999.1.1.1:9101")), 78, "explicit host"),
    (mutated(lambda c: c["image"].update(allowed_tags=r"v3\.9")), 65, "v3.9.0"),
])
def test_a_hostile_agent_config_is_refused_and_quay_keeps_running(node, edit, code, says):
    healthy_run(node)
    before = snapshot(node)
    node.agent.config_path.write_text(edit(node.agent.config_path.read_text()))
    got, out, err = node.agent.run("run", "--once")
    assert got == code, out + err[-2000:]
    assert says in err and SECRET not in out + err
    assert_nothing_lost(node, before)


# Issue 16: what real Quay showed would fail for good once started, refused before it is.
@pytest.mark.parametrize("overrides,where,says", [
    ({"PREFERRED_URL_SCHEME": "http"}, "ssl.key", "503"),  # TLS on anyway: self-checks fail
    ({"EXTERNAL_TLS_TERMINATION": True}, "ssl.key", "EXTERNAL_TLS_TERMINATION is true"),
    ({"DISTRIBUTED_STORAGE_PREFERENCE": ["local_us"]}, "DISTRIBUTED_STORAGE_PREFERENCE",
     "pushes would fail"),
])
def test_a_stack_quay_would_fail_on_for_good_is_refused_and_quay_keeps_running(node, overrides,
                                                                            where, says):
    from tests.testbed.stacks import quay_config

    healthy_run(node)
    before = snapshot(node)
    node.backend.put("config.yaml", yaml.safe_dump(quay_config(**overrides)).encode())
    code, out, err = node.agent.run("run", "--once")
    assert code == 78, out + err[-2000:]
    assert where in err and says in err
    assert_nothing_lost(node, before)


@pytest.mark.parametrize("env,code,says", [
    ({"QUAYENTRY": "registry"}, 78, "QUAYENTRY overrides the entry point"),
    ({"QUAY_SERVICES": "nginx,gunicorn-web"}, 78, "QUAY_SERVICES leaves out gunicorn-registry"),
    ({"QUAY_DISTRIBUTED_STORAGE_PREFERENCE": "default,other"}, 78, "on spaces, not commas"),
])
def test_a_container_env_that_breaks_quay_is_refused_and_quay_keeps_running(node, env, code,
                                                                             says):
    healthy_run(node)
    before = snapshot(node)
    node.agent.config_path.write_text(mutated(lambda c: c["container"]["env"].update(env))(
        node.agent.config_path.read_text()))
    got, out, err = node.agent.run("run", "--once")
    assert got == code, out + err[-2000:]
    assert says in err and "container.env" in err
    assert_nothing_lost(node, before)
