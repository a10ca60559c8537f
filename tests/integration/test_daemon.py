"""`quay-bootstrap run`, the daemon, as systemd runs it: a real process against the real dockerd,
registry and moto. What it restarts, when it escalates, and when it holds still: against the
Quay stand-in on the bed's real PostgreSQL and Redis where Quay's behaviour matters (health,
restarts, shared outages, RDS), else against the busybox fake."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

import boto3
import pytest

from tests.integration.conftest import FAST, held_socket, lines, wait_for, wait_for_probes
from tests.testbed import faults, quay_standin
from tests.testbed.quay_standin import HEADS

# Probes judged while a fault lasts, each a chance to restart that the watchdog did not take:
# twice failure_threshold, and one more (a probe is counted just before it is judged).
HELD_PROBES = 2 * FAST["failure_threshold"] + 1


def started_at(node):
    """When the node's Quay last started; None while there is none (read once: the agent may
    remove it between two reads)."""
    found = node.found()
    return found.attrs["State"]["StartedAt"] if found is not None else None


@pytest.mark.standin
def test_docker_kill_is_restarted_within_a_second_and_counted_once(node, daemon):
    agent = daemon()
    agent.wait_state("healthy")
    before = started_at(node)
    node.docker.api.kill(node.name)
    killed = time.monotonic()
    wait_for(lambda: node.found().status == "running" and started_at(node) != before, 5,
             "the container running again")
    assert time.monotonic() - killed < 1.5
    status = agent.wait_state("healthy")
    assert status["restarts_in_window"] == 1
    assert status["marked_unhealthy"] is False
    assert node.found().status == "running" and node.revision() == HEADS["v3.11.0"]  # nothing lost


@pytest.mark.standin
def test_a_broken_node_is_restarted_with_backoff_then_marked_unhealthy_once(
        node, daemon, asg_group, moto_endpoint, tmp_path):
    asg, instance, imds = asg_group.asg, asg_group.instance_id, asg_group.url + "/"
    ran = tmp_path / "on-unhealthy.log"
    hook = [sys.executable, "-c",
            f"import os; open({str(ran)!r}, 'a').write(os.environ['QUAY_BOOTSTRAP_REASON'] + '\\n')"]
    node.state("fail web_gunicorn")
    agent = daemon(env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": imds,
                        "AWS_ENDPOINT_URL": moto_endpoint},
                   report={"autoscaling": "auto", "on_unhealthy": hook})
    wait_for(lambda: agent.get("/healthz")[0] == 503, 40, "/healthz 503; log:\n" + agent.log[-3000:])
    health = asg.describe_auto_scaling_instances(InstanceIds=[instance])
    wait_for(lambda: asg.describe_auto_scaling_instances(InstanceIds=[instance])
             ["AutoScalingInstances"][0]["HealthStatus"].upper() == "UNHEALTHY", 10,
             f"the ASG instance Unhealthy: {health}")
    status = agent.status()
    assert status["restarts_in_window"] >= 3 and status["backoff_seconds"] == 4
    assert "failing: web_gunicorn" in status["marked_reason"]
    starts = len(node.starts())
    wait_for(lambda: len(node.starts()) > starts, 15, "another restart after escalation")
    lines = ran.read_text().splitlines()
    assert len(lines) == 1 and "web_gunicorn" in lines[0]  # exactly once per episode
    metrics = agent.get("/metrics")[1].decode()
    assert "quay_bootstrap_marked_unhealthy 1.0" in metrics
    assert 'quay_bootstrap_state{state="failing"}' in metrics or \
        'quay_bootstrap_state{state="starting"}' in metrics
    node.state("healthy")
    agent.wait_state("healthy", timeout=30)
    assert agent.get("/healthz")[0] == 200  # a node that recovers says so again
    assert node.found().status == "running" and node.revision() == HEADS["v3.11.0"]


@pytest.mark.standin
@pytest.mark.parametrize("fault", ["down", "hung"])
def test_a_shared_database_outage_is_held_not_restarted(node, daemon, testbed, fault):
    """PostgreSQL stopped (refused at once) or hung (Quay's check gives up after its 3 s
    connect timeout): every node's /health/instance fails on `database` alone. The probe
    timeout is the agent's default, which allows for Quay's own worst case."""
    agent = daemon(health={"timeout": None})
    agent.wait_state("healthy")
    before = started_at(node)
    with getattr(faults, fault)(testbed["dir"], "postgres"):
        status = agent.wait_state("shared-outage")
        wait_for_probes(agent, HELD_PROBES)
        assert started_at(node) == before and '"container.restarting"' not in agent.log
        assert agent.get("/healthz")[0] == 200 and agent.status()["state"] == "shared-outage"
        assert status["marked_unhealthy"] is False
    assert status["last_probe"]["services"]["database"] is False
    assert status["last_probe"]["services"]["web_gunicorn"] is True
    agent.wait_state("healthy")
    assert started_at(node) == before and node.found().status == "running"
    assert node.revision() == HEADS["v3.11.0"]  # nothing lost
    assert agent.status()["restarts_in_window"] == 0
    assert agent.log.count('"health.shared_outage"') == 1
    assert '"health.shared_outage_ended"' in agent.log


@pytest.mark.standin
def test_a_database_slow_for_everyone_is_held_not_restarted(node, daemon):
    """A table locked by a long transaction: Quay's database check waits out its 5 s statement
    timeout, so /health/instance answers 503 (database) after 5 s on every node at once. The
    agent's default probe timeout allows for Quay's own worst case."""
    import psycopg2

    agent = daemon(health={"timeout": None})
    agent.wait_state("healthy")
    before = started_at(node)
    locker = psycopg2.connect(node.database, connect_timeout=5)
    try:
        with locker.cursor() as cur:
            cur.execute("LOCK TABLE teamrole IN ACCESS EXCLUSIVE MODE")
        began = time.monotonic()
        code, _ = quay_get(node.port, "/health/instance", timeout=20)
        assert code == 503 and time.monotonic() - began >= 5
        status = agent.wait_state("shared-outage", timeout=15)
        wait_for_probes(agent, HELD_PROBES)  # more slow probes, each a 503 after 5 s
        assert started_at(node) == before and agent.status()["state"] == "shared-outage"
        assert '"container.restarting"' not in agent.log
        assert status["last_probe"]["services"]["database"] is False
        assert status["marked_unhealthy"] is False
    finally:
        locker.rollback()
        locker.close()
    status = agent.wait_state("healthy", timeout=15)
    assert started_at(node) == before and status["restarts_in_window"] == 0
    assert '"container.restarting"' not in agent.log
    assert node.revision() == HEADS["v3.11.0"]


def quay_get(port, path, timeout):
    """(status, body) of Quay's own endpoint, however long it takes up to TIMEOUT."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.mark.standin
def test_an_rds_failover_is_held_even_when_the_database_is_not_shared(node, daemon, testbed,
                                                                      moto_endpoint):
    rds = boto3.client("rds", region_name="us-east-1", endpoint_url=moto_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    rds.create_db_instance(DBInstanceIdentifier="quay-db", DBInstanceClass="db.t3.micro",
                           Engine="postgres", MasterUsername="quay", MasterUserPassword="x" * 12,
                           AllocatedStorage=20)
    rds.stop_db_instance(DBInstanceIdentifier="quay-db")
    agent = daemon(env={"AWS_ENDPOINT_URL": moto_endpoint},
                   health={"shared_services": ["redis", "storage"]},
                   report={"rds": {"db_instance": "quay-db", "region": "us-east-1"}})
    agent.wait_state("healthy")
    before = started_at(node)
    with faults.down(testbed["dir"], "postgres"):
        agent.wait_state("shared-outage")
        wait_for_probes(agent, HELD_PROBES)
        assert started_at(node) == before and '"container.restarting"' not in agent.log
        assert agent.status()["marked_unhealthy"] is False
    assert '"rds.not_available"' in agent.log
    agent.wait_state("healthy")
    assert started_at(node) == before and node.revision() == HEADS["v3.11.0"]


@pytest.mark.standin
def test_a_hanging_health_endpoint_counts_as_failing(node, daemon):
    agent = daemon()
    agent.wait_state("healthy")
    before = started_at(node)
    node.state("hang")  # the web worker that serves /health/instance hangs
    wait_for(lambda: started_at(node) != before, 15, "a restart")
    assert "timed out after 1s" in agent.log
    node.state("healthy")
    agent.wait_state("healthy")
    assert node.found().status == "running" and node.revision() == HEADS["v3.11.0"]


@pytest.mark.standin(tag="v3.10.0")
def test_an_old_quay_restarted_after_another_node_migrated_still_serves(node, daemon, tmp_path,
                                                                       moto_endpoint):
    agent = daemon(refresh_interval="1s")
    agent.wait_state("healthy")
    # Another node starts v3.11.0 on the shared database and migrates it.
    stack = quay_standin.write_stack(tmp_path / "newer-stack", node_config(node))
    newer = quay_standin.start(node.docker, node.images["v3.11.0"], stack,
                               http_port=quay_standin.free_port(), control_dir=tmp_path / "newer")
    try:
        quay_standin.wait_serving(newer)
    finally:
        newer.remove(force=True, v=True)
    assert node.revision() == HEADS["v3.11.0"]
    # What that node's agent, the canary, records beside the leases once it migrated.
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.put_object(Bucket=node.backend.url.split("/")[2], Key="conf/stack.rollout/database",
                  Body=json.dumps({"image": node.images["v3.11.0"], "tag": "v3.11.0"}).encode())
    wait_for(lambda: agent.status().get("degraded"), 10, "the node to see it is behind")
    before, killed = started_at(node), time.time()
    node.docker.api.kill(node.name)
    wait_for(lambda: started_at(node) not in (None, before), 10, "a restart")
    # Started without migrating (registry-nomigrate): it serves, degraded until rolled forward.
    wait_for(lambda: "serving on" in node.logs(killed) or "Can't locate" in node.logs(killed), 15,
             "the restarted Quay serving or failing")
    assert "Can't locate revision" not in node.logs(killed)
    assert quay_get(node.port, "/health/instance", timeout=5)[0] == 200
    assert node.revision() == HEADS["v3.11.0"]


def node_config(node) -> dict:
    import yaml

    return yaml.safe_load(node.config_yaml())


def test_sd_notify_ready_only_after_healthy_and_watchdog_pings(node, daemon, tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    messages = []

    def drain(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except socket.timeout:
                pass

    node.state("fail web_gunicorn")
    agent = daemon(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"},
                   health={"start_period": "60s"})
    drain(3)
    assert not any("READY=1" in m for m in messages)
    assert sum("WATCHDOG=1" in m for m in messages) >= 3
    assert any(m.startswith("STATUS=starting") for m in messages)
    node.state("healthy")
    drain(3)
    assert any("READY=1" in m for m in messages)
    agent.stop()
    drain(0.5)
    assert any("STOPPING=1" in m for m in messages)
    sock.close()


def test_sigterm_stops_at_once_and_leaves_quay_running_for_the_next_agent(node, daemon):
    agent = daemon()
    agent.wait_state("healthy")
    before = started_at(node)
    agent.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert agent.proc.wait(timeout=5) == 0
    assert time.monotonic() - stopped < 2
    assert node.found().status == "running"
    again = daemon()
    again.wait_state("healthy")
    assert started_at(node) == before and len(node.starts()) == 1
    assert '"action": "adopt"' in again.log


def test_on_systemds_socket_a_check_made_while_no_agent_runs_is_answered_by_the_next(node, daemon):
    """quay-bootstrap.socket: systemd holds the listening socket across an agent restart (an
    agent upgrade reaches every node at once), so a load balancer's check is never refused."""
    held = held_socket(node.listen)
    try:
        agent = daemon(listen_socket=held)
        agent.wait_state("healthy")
        assert lines(agent, "endpoint.inherited")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(timeout=5) == 0
        host, _, port = node.listen.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=2) as check:  # no agent runs
            check.sendall(b"GET /ready HTTP/1.1\r\nHost: lb\r\n\r\n")
            again = daemon(listen_socket=held)
            check.settimeout(30)
            answer = check.makefile("rb").readline()
        assert answer.startswith(b"HTTP/1.1 200"), (answer, again.log[-2000:])
        assert node.found().status == "running"
    finally:
        held.close()


def test_status_command_reads_the_running_agent(node, daemon):
    agent = daemon()
    agent.wait_state("healthy")
    code, out, _ = node.agent.run("status")
    assert code == 0 and "state       healthy" in out and "marked      no" in out
    code, out, _ = node.agent.run("status", "--json")
    assert json.loads(out)["state"] == "healthy"
    agent.stop()
    code, out, _ = node.agent.run("status")
    assert code == 0 and "the agent's endpoint did not answer" in out
    os.unlink(node.report["state_file"])
    code, _, err = node.agent.run("status")
    assert code == 1 and "is quay-bootstrap.service running?" in err


def test_each_restart_counts_once(node, daemon):
    """Restarting a running container makes Docker report a die and a start: those are echoes
    of our own restart, not a second one."""
    node.state("fail web_gunicorn")
    agent = daemon(restart={"unhealthy_after": 99})
    wait_for(lambda: agent.log.count('"container.restarting"') >= 2, 40, "two restarts")
    node.state("healthy")
    status = agent.wait_state("healthy", timeout=30)
    assert status["restarts_in_window"] == agent.log.count('"container.restarting"')
    assert '"container.restarted_by_docker"' not in agent.log


def test_sighup_applies_a_new_stack_and_a_bad_config_keeps_quay_watched(node, daemon):
    agent = daemon()
    agent.wait_state("healthy")
    old_id = node.found().id
    node.backend.put("robots.txt", b"User-agent: *\nDisallow: /changed\n")
    agent.proc.send_signal(signal.SIGHUP)
    def replaced():
        found = node.found()  # once: between rename and create there is no container
        return found is not None and found.id != old_id

    wait_for(replaced, 20, "the container replaced with the new stack")
    version, files = node.agent.live()
    assert files["robots.txt"].endswith(b"/changed\n")
    assert node.found().labels["io.quay-bootstrap.stack-version"] == version
    status = wait_for(lambda: agent.status().get("stack_version") == version and
                      agent.status().get("state") == "healthy" and agent.status(), 20,
                      "healthy on the new stack")
    # Probes judged after it: the replacement's Docker events, on the same queue before them,
    # were judged first.
    wait_for_probes(agent, 3)
    status = agent.status()
    assert status["restarts_in_window"] == 0 and status["state"] == "healthy"  # not a failure
    assert '"container.restarting"' not in agent.log
    node.agent.config_path.write_text("stack: [broken\n")
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: '"agent.reload_failed"' in agent.log, 10, "the reload refused")
    assert agent.proc.poll() is None and agent.status()["state"] == "healthy"


def test_a_refresh_that_changes_nothing_logs_nothing_at_info_and_a_change_says_what(node, daemon):
    agent = daemon(refresh_interval="2s")
    agent.wait_state("healthy")
    wait_for(lambda: lines(agent, "rollout.unchanged"), 20, "a first refresh")
    mark = len(agent.log)
    wait_for(lambda: len(lines(agent, "rollout.unchanged", mark)) >= 3, 30, "three refreshes")
    steady = [json.loads(line) for line in agent.log[mark:].splitlines() if line.startswith("{")]
    assert [e["event"] for e in steady if e["level"] != "debug"] == []
    assert {"stack.done", "lock.done", "image.done"} <= {e["event"] for e in steady}  # at debug

    mark, before = len(agent.log), node.agent.live()[0]
    node.backend.put("robots.txt", b"User-agent: *\nDisallow: /changed\n")
    wait_for(lambda: lines(agent, "rollout.applied", mark), 30, "the new stack rolled out")
    version, _ = node.agent.live()
    told = [e for e in lines(agent, ("stack.applied", "stack.done", "lock.done", "image.done"), mark)
            if e["level"] == "info"]
    assert [(e["event"], e["version"], e["previous"]) for e in told] == [
        ("stack.applied", version, before)]  # one line says what changed
    assert {"stack.done", "lock.done", "image.done"} <= {e["event"] for e in lines(agent, (
        "stack.done", "lock.done", "image.done"), mark)}  # the steps' own lines, at debug


def test_a_crash_right_after_our_restart_is_still_seen(node, daemon):
    """Our restart's own die/start are echoes; a real exit a moment later is not one of them."""
    agent = daemon(health={"start_period": "15s"})
    agent.wait_state("healthy")
    before = started_at(node)
    node.docker.api.kill(node.name)
    wait_for(lambda: node.found().status == "running" and started_at(node) != before, 5,
             "the first restart")
    second = started_at(node)
    time.sleep(0.2)
    node.docker.api.kill(node.name)
    killed = time.monotonic()
    wait_for(lambda: node.found().status == "running" and started_at(node) != second, 8,
             "the second restart (not 15 s of start period later)")
    assert time.monotonic() - killed < 4  # backoff_initial 1 s, then at once
    assert agent.status()["restarts_in_window"] == 2


def test_the_running_agent_writes_its_record_for_the_cluster_view(node, daemon):
    agent = daemon()
    agent.wait_state("healthy")
    version, _ = node.agent.live()

    def shown():
        code, out, _ = node.agent.run("cluster", "--json")
        doc = json.loads(out)
        return code == 0 and doc["nodes"] and doc["nodes"][0]["state"] == "healthy" and doc
    doc = wait_for(shown, 20, "the node healthy in `quay-bootstrap cluster`")
    assert [n["stack_version"] for n in doc["nodes"]] == [version]
    assert doc["target"] == version and doc["published"] is None
