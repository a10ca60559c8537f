"""Changes across the cluster: refresh, apply with rollback, the lease budget, the canary. A roll's
effect on Quay (applied, rolled back, an image upgrade that migrates the database, the canary)
runs on the Quay stand-in with the bed's real PostgreSQL and Redis; the lease budget on the
busybox fake."""
from __future__ import annotations

import json
import signal
import time

import boto3
import pytest

from tests.integration.conftest import (
    BACKOFF,
    LEFT_ALONE,
    Agent,
    Daemon,
    Node,
    wait_for,
    wait_for_lines,
)
from tests.testbed import quay_standin
from tests.testbed.quay_standin import HEADS

ROLL = {"health": {"interval": "10s", "timeout": "1s", "failure_threshold": 2,
                   "start_period": "4s"},
        "refresh_interval": "1s"}


def start(node, daemon, **extra):
    agent = daemon(health=ROLL["health"], refresh_interval=ROLL["refresh_interval"], **extra)
    agent.wait_state("healthy")
    return agent


def put_lock(node, moto_endpoint, reference) -> str:
    """The cluster lock beside the stack (not in it: it would change the stack too)."""
    s3, bucket = leases(node, moto_endpoint)
    s3.put_object(Bucket=bucket, Key="quay-lock.yaml", Body=f"reference: {reference}\n".encode())
    return f"s3://{bucket}/quay-lock.yaml"


def leases(node, moto_endpoint):
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    bucket = node.backend.url.split("/")[2]
    return s3, bucket


@pytest.mark.standin
def test_a_change_in_the_bucket_reaches_the_node_within_an_interval(node, daemon):
    agent = start(node, daemon)
    old = node.found().id
    node.backend.put("robots.txt", b"User-agent: *\nDisallow: /refreshed\n")
    changed = time.monotonic()
    wait_for(lambda: '"rollout.applied"' in agent.log, 20, "the change applied")
    assert time.monotonic() - changed < 1.2 + 4 + 3  # interval + jitter, start, margin
    assert node.found().id != old
    version, files = node.agent.live()
    assert files["robots.txt"].endswith(b"/refreshed\n")
    assert agent.status()["last_change"]["result"] == "applied"
    assert agent.log.index('"rollout.lease_acquired"') < agent.log.index('"rollout.replacing"')
    assert _events(agent, "rollout.replacing")[0]["reason"] == "changed: stack version"
    agent.wait_state("healthy", timeout=3)  # seen at once, not after a whole probe interval
    assert node.found().status == "running" and node.revision() == HEADS["v3.11.0"]
    assert "Running upgrade" not in node.logs()  # the same image: nothing to migrate


def test_an_invalid_stack_is_never_applied_and_is_reported(node, daemon):
    agent = start(node, daemon)
    before_id, (version, _) = node.found().id, node.agent.live()
    node.backend.put("config.yaml", b"SERVER_HOSTNAME: [broken\n")
    wait_for(lambda: '"rollout.failed"' in agent.log, 10, "the failure reported")
    # The next refresh reads the same stack again, and refuses it again.
    wait_for_lines(agent, "rollout.failed", 2, timeout=10)
    assert node.found().id == before_id and node.agent.live()[0] == version
    assert "not valid YAML" in agent.status()["last_change"]["error"]
    assert agent.status()["state"] == "healthy"


@pytest.mark.standin
@pytest.mark.parametrize("breaks", ["refused at start", "unhealthy"])
def test_a_stack_that_makes_quay_unhealthy_is_rolled_back_and_not_retried(node, daemon, breaks):
    """Two configs the agent cannot judge offline: Quay's own online validation refuses the
    first (its database does not exist) and the container exits; with the second Quay runs
    but its disk_space check fails."""
    agent = start(node, daemon)
    good_version, _ = node.agent.live()
    if breaks == "refused at start":
        bad = node.config_yaml(DB_URI=node.database.rsplit("/", 1)[0] + "/no_such_database")
    else:
        bad = node.config_yaml(DISKSPACE_HEALTH_THRESHOLD=1.0)
    node.backend.put("config.yaml", bad)
    wait_for(lambda: '"rollout.rolled_back"' in agent.log, 40, "the rollback")
    status = agent.wait_state("healthy", timeout=20)
    assert node.found().labels["io.quay-bootstrap.stack-version"] == good_version
    assert node.agent.live()[0] == good_version  # `current` is back too
    assert status["last_change"]["result"] == "rolled back"
    replaced, mark = agent.log.count('"rollout.replacing"'), len(agent.log)
    # Several refreshes see the same bad version and leave it: it is not tried again.
    wait_for_lines(agent, "stack.still_rejected", 3, since=mark, timeout=15)
    assert agent.log.count('"rollout.replacing"') == replaced
    assert "quay_bootstrap_rollbacks_total 1.0" in agent.get("/metrics")[1].decode()
    assert status["restarts_in_window"] == 0  # a rollback is not a watchdog restart
    assert node.found().status == "running" and node.revision() == HEADS["v3.11.0"]


@pytest.mark.standin(tag="v3.10.0")
def test_an_upgrade_pulls_before_it_stops_quay_and_records_the_canary(node, daemon,
                                                                       moto_endpoint):
    agent = start(node, daemon)
    assert node.revision() == HEADS["v3.10.0"]
    node.docker.images.remove(node.images["v3.11.0"])
    lock = put_lock(node, moto_endpoint, node.images["v3.11.0"])
    node.configure(image={"lock": lock}, health=ROLL["health"], refresh_interval="1s")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"rollout.applied"' in agent.log, 30, "the upgrade applied")
    log = agent.log
    assert log.index('"image.pulled"') < log.index('"rollout.replacing"')
    assert node.starts()[-1][1] == node.image_id("v3.11.0")
    assert node.found().image.id == node.image_id("v3.11.0")
    s3, bucket = leases(node, moto_endpoint)
    record = json.loads(s3.get_object(Bucket=bucket, Key="conf/stack.rollout/upgrade")["Body"].read())
    assert record["state"] == "healthy" and record["canary"].endswith(node.name)
    # The canary migrated the database, once, and serves on it.
    assert node.revision() == HEADS["v3.11.0"]
    quay_log = node.logs()
    assert "Running upgrade 946f0e90f9c9 -> b4da5b09c8df" in quay_log
    assert "quay stand-in v3.11.0 serving" in quay_log
    assert agent.status()["state"] == "healthy" and node.found().status == "running"


def test_a_held_lease_delays_the_roll_until_it_expires(node, daemon, moto_endpoint):
    agent = start(node, daemon)
    s3, bucket = leases(node, moto_endpoint)
    expires = time.time() + 5
    s3.put_object(Bucket=bucket, Key="conf/stack.rollout/lease-0",
                  Body=json.dumps({"holder": "a-node-that-died", "expires": expires}).encode())
    node.backend.put("robots.txt", b"User-agent: *\nDisallow: /later\n")
    wait_for(lambda: '"rollout.waiting_for_lease"' in agent.log, 10, "waiting for the lease")
    wait_for(lambda: '"rollout.applied"' in agent.log, 30, "the change applied")
    event = [json.loads(line) for line in agent.log.splitlines()
             if '"rollout.lease_taken_over"' in line]
    assert event and event[0]["from_holder"] == "a-node-that-died"
    replacing = [json.loads(line) for line in agent.log.splitlines()
                 if '"rollout.replacing"' in line][0]
    from datetime import datetime

    stamp = datetime.fromisoformat(replacing["timestamp"].replace("Z", "+00:00")).timestamp()
    assert stamp >= expires - 0.5  # not before the dead node's lease ran out
    def released():  # left behind already expired: a conditional replace, not a delete
        body = s3.get_object(Bucket=bucket, Key="conf/stack.rollout/lease-0")["Body"].read()
        return json.loads(body)["expires"] <= time.time()

    wait_for(released, 5, "the lease released after the roll")


@pytest.mark.standin(tag="v3.10.0")
def test_a_failed_canary_stops_the_rollout(node, daemon, moto_endpoint):
    agent = start(node, daemon)
    digest = node.docker.images.get(node.images["v3.11.0"]).attrs["RepoDigests"][0]
    s3, bucket = leases(node, moto_endpoint)
    s3.put_object(Bucket=bucket, Key="conf/stack.rollout/upgrade", Body=json.dumps(
        {"image": digest, "canary": "other-node", "state": "failed", "since": time.time()}).encode())
    before = node.found().id
    lock = put_lock(node, moto_endpoint, node.images["v3.11.0"])
    node.configure(image={"lock": lock}, health=ROLL["health"], refresh_interval="1s")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"rollout.stopped"' in agent.log, 20, "the rollout stopped")
    wait_for_lines(agent, LEFT_ALONE, 2, since=agent.log.index('"rollout.stopped"'),
                   timeout=10)  # two refreshes since, and neither rolled
    assert node.found().id == before
    # Nothing lost: the old Quay still serves, on a database nobody migrated.
    assert node.found().status == "running" and node.revision() == HEADS["v3.10.0"]
    assert agent.status()["state"] == "healthy"


@pytest.mark.standin(tag="v3.10.0")
def test_a_canary_that_failed_after_migrating_is_held_not_rolled_back(node, daemon,
                                                                      moto_endpoint):
    agent = start(node, daemon)
    # The new version fails its web_gunicorn check once started: its control folder says so.
    canary_control = node.control / "canary"
    canary_control.mkdir()
    canary_control.chmod(0o777)
    quay_standin.set_local(canary_control, "web_gunicorn", "fail")
    lock = put_lock(node, moto_endpoint, node.images["v3.11.0"])
    node.configure(image={"lock": lock}, health=ROLL["health"], refresh_interval="1s",
                   container={"env": {"QUAY_STANDIN_CONTROL": "/control/canary"}})
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: node.revision() == HEADS["v3.11.0"], 30, "the canary's migration")
    # start_period (4 s) runs out, the canary is judged failed, and the agent acts on it.
    wait_for(lambda: '"rollout.rolling_back"' in agent.log or
             "canary" in json.dumps(agent.status().get("last_change") or {}), 20,
             "the canary's verdict")
    # The roll is over: two refreshes since leave the held node as it is.
    wait_for_lines(agent, LEFT_ALONE, 2, since=len(agent.log), timeout=10)
    # Never the old image against the database the canary migrated: the canary's container is
    # kept (for `docker logs`), the node held out of service.
    assert "Can't locate revision" not in node.logs()
    found = node.found()
    assert found is not None and found.image.id == node.image_id("v3.11.0")
    assert all(image == node.image_id("v3.11.0") for _, image in node.starts()[1:])
    assert agent.get("/healthz")[0] == 503
    assert node.revision() == HEADS["v3.11.0"]


def _events(agent, name):
    from datetime import datetime

    found = []
    for line in agent.log.splitlines():
        if f'"{name}"' in line:
            event = json.loads(line)
            event["at"] = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            found.append(event)
    return found


@pytest.fixture
def cluster(node, s3_backend, docker_client, testbed, fake_images, tmp_path, monkeypatch, capsys):
    """Three nodes (separate agents, containers and ports) on one bucket; the first is `node`."""
    nodes = [node]
    for i in (1, 2):
        folder = tmp_path / f"node{i}"
        folder.mkdir()
        agent = Agent(folder / "agent.yaml", folder / "stack", capsys, {})
        nodes.append(Node(agent, s3_backend, docker_client, testbed, fake_images, folder,
                          monkeypatch))
    agents = []

    def start(**rollout):
        for each in nodes:
            each.configure(health=ROLL["health"], restart=BACKOFF, refresh_interval="1s",
                           rollout={"max_unavailable": 1, **rollout})
            agents.append(Daemon(each))
        for agent in agents:
            agent.wait_state("healthy", timeout=30)
        return agents

    yield nodes, start
    for agent in agents:
        agent.stop()
    for each in nodes[1:]:
        each.cleanup()


def test_three_nodes_roll_one_at_a_time(cluster):
    nodes, start = cluster
    agents = start(lease_ttl="60s")
    nodes[0].backend.put("robots.txt", b"User-agent: *\nDisallow: /rolled\n")
    wait_for(lambda: all(_events(a, "rollout.applied") for a in agents), 60,
             "every node rolled")
    windows = sorted((_events(a, "rollout.replacing")[0]["at"], _events(a, "rollout.applied")[0]["at"])
                     for a in agents)
    for (_, first_end), (second_start, _) in zip(windows, windows[1:]):
        assert second_start >= first_end, windows  # never two nodes down at once
    for each in nodes:
        assert each.agent.live()[1]["robots.txt"].endswith(b"/rolled\n")


def test_a_killed_lease_holder_delays_the_others_only_until_its_lease_expires(cluster):
    nodes, start = cluster
    agents = start(lease_ttl="10s")  # above stop_timeout + start_period (9s)
    nodes[0].backend.put("robots.txt", b"User-agent: *\nDisallow: /killed\n")
    holder = wait_for(lambda: next((a for a in agents if _events(a, "rollout.lease_acquired")),
                                   None), 30, "a lease holder")
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait(timeout=10)
    taken = _events(holder, "rollout.lease_acquired")[0]["at"]
    others = [a for a in agents if a is not holder]
    wait_for(lambda: all(_events(a, "rollout.applied") for a in others), 60,
             "the others rolled after the lease expired")
    firsts = sorted(_events(a, "rollout.replacing")[0]["at"] for a in others)
    assert firsts[0] >= taken + 10 - 1.0  # waited for the dead holder's lease to run out
    assert firsts[0] < taken + 10 + 10  # ... and not much longer
    assert any(_events(a, "rollout.lease_taken_over") for a in others)


@pytest.mark.standin
def test_a_published_version_rolls_in_is_rolled_back_when_bad_and_not_retried(node, daemon):
    """The daemon on a published stack: a good publication rolls in; one that makes Quay
    unhealthy is rolled back and left until another version is published."""
    from tests.integration.test_publish import publisher

    agent = start(node, daemon)
    _, files = node.agent.live()
    good = {**files, "robots.txt": b"User-agent: *\nDisallow: /published\n"}
    first = publisher(node.agent).publish(good).pointer
    wait_for(lambda: '"rollout.applied"' in agent.log, 30, "the published version rolled in")
    agent.wait_state("healthy", timeout=20)
    assert node.agent.live()[0] == first.version
    assert node.found().labels["io.quay-bootstrap.stack-version"] == first.version

    bad = {**good, "config.yaml": node.config_yaml(DISKSPACE_HEALTH_THRESHOLD=1.0)}
    publisher(node.agent).publish(bad)
    wait_for(lambda: '"rollout.rolled_back"' in agent.log, 40, "the rollback")
    agent.wait_state("healthy", timeout=20)
    assert node.agent.live()[0] == first.version
    mark = len(agent.log)
    wait_for_lines(agent, "stack.still_rejected", 3, since=mark, timeout=15)
    assert node.found().labels["io.quay-bootstrap.stack-version"] == first.version
