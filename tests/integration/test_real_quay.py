"""The agent on REAL Quay (v3.17.4 and v3.18.0 built from ../shared/quay by tests/testbed/real_quay.py)
with the bed's PostgreSQL 15, Redis and SeaweedFS: a node's first boot, Quay's own answers (boot
shape, an older image on a migrated database, SIGTERM), and what the agent decides from them.

Each node runs nginx and both gunicorns, one worker each, without the online validation (no Go
config-tool here): see REAL_QUAY_ENV in conftest.py.
"""
from __future__ import annotations

import http.client
import json
import ssl
import time
import uuid

import pytest

from quay_bootstrap.config import ContainerConfig, HealthConfig
from tests.integration.conftest import Daemon, RealQuayNode, real_quay_env, wait_for
from tests.testbed import quay_standin, real_quay

INSTANCE_OK = {"data": {"services": {"auth": True, "database": True, "disk_space": True,
                                     "registry_gunicorn": True, "service_key": True,
                                     "web_gunicorn": True}},
               "status_code": 200}
# /health/endtoend: the shared services only. Its storage check writes to the bed's SeaweedFS
# (an S3Storage config with s3_region sent it to AWS instead: quay_standin.config).
ENDTOEND_OK = {"data": {"services": {"auth": True, "database": True, "redis": True,
                                     "storage": True}}, "status_code": 200}


def get(port: int, path: str = "/health/instance", timeout: float = 20):
    """(HTTP status, parsed JSON body or None); (None, error name) when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        body = answer.read()
        try:
            return answer.status, json.loads(body)
        except ValueError:
            return answer.status, None
    except OSError as err:
        return None, type(err).__name__
    finally:
        conn.close()


@pytest.fixture
def real_node(agent, s3_backend, docker_client, testbed, tmp_path, monkeypatch, real_images,
              real_db, quay_bucket):
    made = RealQuayNode(agent, s3_backend, docker_client, testbed, real_images, tmp_path,
                        monkeypatch, database=real_db, bucket=quay_bucket, tag="v3.18.0")
    made.configure(health={"start_period": "240s", "timeout": None})
    yield made
    made.cleanup()


@pytest.fixture
def real_daemon(real_node):
    started = []

    def start(**config):
        real_node.configure(**config)
        made = Daemon(real_node)
        started.append(made)
        return made

    yield start
    for made in started:
        made.stop()


class Boot:
    """Quay started by hand (no agent), its /health/instance answers recorded until 200."""

    def __init__(self, docker_client, image: str, stack, *, command: str = "registry",
                 env: dict = None):
        self.port = quay_standin.free_port()
        self.began = time.monotonic()
        self.container = docker_client.containers.run(
            image, [command], name=f"real-quay-{uuid.uuid4().hex[:8]}", network_mode="host",
            detach=True, environment={**real_quay_env(self.port), **(env or {})},
            volumes={str(stack): {"bind": "/conf/stack", "mode": "ro"}})
        self.shape = []  # (seconds since start, status or error name), on each change

    def until_200(self, timeout: float = 180) -> float:
        """Seconds from the container's start to the first 200 (AssertionError if it exits)."""
        while time.monotonic() - self.began < timeout:
            status, body = get(self.port, timeout=10)
            seen = status if status is not None else body
            if not self.shape or self.shape[-1][1] != seen:
                self.shape.append((round(time.monotonic() - self.began, 2), seen))
            if status == 200:
                return time.monotonic() - self.began
            self.container.reload()
            assert self.container.status != "exited", self.logs()[-4000:]
            time.sleep(0.1)
        raise AssertionError(f"no 200 after {timeout} s: {self.shape}\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        return self.container.logs().decode(errors="replace")

    def remove(self) -> None:
        from docker.errors import NotFound

        try:
            self.container.remove(force=True, v=True)
        except NotFound:
            pass  # removed by the test already


@pytest.fixture
def boots(docker_client, real_images):
    made = []

    def start(tag: str, stack, **kwargs) -> Boot:
        boot = Boot(docker_client, real_images[tag], stack, **kwargs)
        made.append(boot)
        return boot

    yield start
    for boot in made:
        boot.remove()


@pytest.fixture
def real_stack(testbed, tmp_path, real_db, quay_bucket):
    return quay_standin.write_stack(tmp_path / "stack", quay_standin.config(
        testbed, database=real_db, bucket=quay_bucket))


# ------------------------------------------------------------------ Quay's own answers


def test_boot_shape_on_a_fresh_and_a_migrated_database_within_the_default_start_period(
        boots, real_stack, real_db):
    """Refused, then nginx's 502 ("Quay Loading") until the web gunicorn's socket exists, then
    200 (a 503 with registry_gunicorn false may show between): none of it is a failure inside
    health.start_period, whose default must cover a cold start with every migration."""
    head, count = real_quay.heads("v3.18.0")
    fresh = boots("v3.18.0", real_stack)
    cold = fresh.until_200()
    assert fresh.logs().count("Running upgrade") == count == 124
    assert quay_standin.db_revision(real_db) == head
    fresh.remove()
    again = boots("v3.18.0", real_stack)
    warm = again.until_200()
    assert "Running upgrade" not in again.logs()
    print(json.dumps({"cold_boot_s": round(cold, 1), "cold_shape": fresh.shape,
                      "migrated_boot_s": round(warm, 1), "migrated_shape": again.shape}))
    for shape in (fresh.shape, again.shape):
        assert shape[0][1] in ("ConnectionRefusedError", 502), shape
        assert {seen for _, seen in shape} <= {"ConnectionRefusedError", 502, 503, 200}, shape
        assert shape[-1][1] == 200
    assert 502 in {seen for _, seen in fresh.shape}  # nginx is up well before the gunicorns
    # Our 2-core figures with one worker each; upstream's own probes allow 150 s and more.
    assert HealthConfig().start_period >= 4 * cold, (HealthConfig().start_period, cold)


def test_an_older_image_with_registry_on_a_migrated_database_fails_as_quay_does(
        boots, real_stack, real_db):
    """v3.17.4's `registry` on a database v3.18.0 migrated: alembic cannot locate the newer
    revision and the start ends (exit 255); `registry-nomigrate` of the same image serves."""
    head, _ = real_quay.heads("v3.18.0")
    boots("v3.18.0", real_stack).until_200()
    older = boots("v3.17.4", real_stack)
    code = older.container.wait(timeout=120)["StatusCode"]
    assert code == 255, older.logs()[-3000:]
    assert f"Can't locate revision identified by '{head}'" in older.logs()
    assert quay_standin.db_revision(real_db) == head
    nomigrate = boots("v3.17.4", real_stack, command="registry-nomigrate")
    nomigrate.until_200()
    assert "runmigration.sh" not in nomigrate.logs()


def test_sigterm_stops_real_quay_within_the_default_stop_timeout(boots, real_stack):
    """supervisord stops its programs on SIGTERM (dumb-init passes it on); the agent's default
    container.stop_timeout must leave it the time, or Docker kills Quay mid-request."""
    boot = boots("v3.18.0", real_stack)
    boot.until_200()
    began = time.monotonic()
    boot.container.stop(timeout=300)
    took = time.monotonic() - began
    state = boot.container.attrs["State"] if boot.container.reload() is None else {}
    print(json.dumps({"sigterm_to_exit_s": round(took, 1), "exit_code": state.get("ExitCode")}))
    assert state.get("ExitCode") == 0, (state, boot.logs()[-2000:])  # not SIGKILLed (137)
    assert ContainerConfig().stop_timeout >= 1.5 * took, (ContainerConfig().stop_timeout, took)


# ------------------------------------------------------------------ the agent on real Quay


def test_a_node_s_first_boot_through_run_once_on_real_quay(real_node):
    code, out, err = real_node.agent.run("run", "--once")
    assert code == 0, err[-3000:]
    assert get(real_node.port) == (200, INSTANCE_OK)
    assert get(real_node.port, "/health/endtoend") == (200, ENDTOEND_OK)
    head, count = real_quay.heads("v3.18.0")
    assert real_node.logs().count("Running upgrade") == count
    assert real_node.revision() == head
    live, files = real_node.agent.live()
    found = real_node.found()
    assert found.labels["io.quay-bootstrap.stack-version"] == live and files["config.yaml"]
    assert found.image.id == real_node.image_id("v3.18.0")


def test_a_node_s_first_boot_through_the_daemon_on_real_quay(real_node, real_daemon):
    run = real_daemon(health={"interval": "1s"})
    status = run.wait_state("healthy", timeout=240)
    assert status["state"] == "healthy"
    assert get(real_node.port) == (200, INSTANCE_OK)
    assert real_node.revision() == real_quay.heads("v3.18.0")[0]
    assert '"container.restarting"' not in run.log and '"instance.marking_unhealthy"' not in run.log


def test_the_agent_starts_an_older_image_without_migrating_once_a_newer_one_migrated(real_node):
    """The database record moved by the v3.18.0 start makes the agent start v3.17.4 with
    `registry-nomigrate`: never the "Can't locate revision" start."""
    code, _, err = real_node.agent.run("run", "--once")
    assert code == 0, err[-3000:]
    real_node.configure(image={"reference": real_node.images["v3.17.4"]})
    code, _, err = real_node.agent.run("run", "--once")
    assert code == 0, err[-3000:]
    wait_for(lambda: get(real_node.port)[0] == 200, 120, "v3.17.4 serving")
    found = real_node.found()
    assert found.image.id == real_node.image_id("v3.17.4")
    assert found.attrs["Config"]["Cmd"] == ["registry-nomigrate"]
    assert "Can't locate revision" not in real_node.logs()
    assert real_node.revision() == real_quay.heads("v3.18.0")[0]


class JwtEndpoint:
    """The JWT authentication endpoint Quay's auth check pings (data/users/externaljwt.py): it
    expects a 4xx to an unauthenticated GET; `down()` stops it (Quay's ping then raises: real
    Quay's /health/instance answers 502 with no service list, the web worker's exception cutting
    the connection), `up()` brings it back on the same port."""

    def __init__(self) -> None:
        self.port = quay_standin.free_port()
        self.server = None
        self.up()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        import http.server
        import threading

        class Refuse(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Refuse)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def test_a_jwt_auth_outage_is_shared_and_a_hung_gunicorn_is_local(real_node, real_daemon):
    """JWT authentication down: Quay's /health/instance answers an error without a service list
    (502 here) on every node, while both gunicorns answer Quay's own ping: no restart, no mark. A hung web
    gunicorn (SIGSTOP) times the probe out AND the ping: this node's failure, restarted."""
    jwt = JwtEndpoint()
    try:
        real_node.backend.upload({
            "config.yaml": real_node.config_yaml(
                AUTHENTICATION_TYPE="JWT", JWT_AUTH_ISSUER="qb-test",
                JWT_VERIFY_ENDPOINT=jwt.url + "/verify", JWT_QUERY_ENDPOINT=jwt.url + "/query",
                JWT_GETUSER_ENDPOINT=jwt.url + "/getuser"),
            "jwt-authn.cert": quay_standin.tls_pair()["ssl.cert"]})
        run = real_daemon(health={"interval": "1s", "failure_threshold": 2, "timeout": "5s",
                                  "start_period": "240s"},
                          restart={"backoff_initial": "1s", "backoff_max": "4s",
                                   "unhealthy_after": 3})
        run.wait_state("healthy", timeout=240)
        first = real_node.found().id
        began = real_node.found().attrs["State"]["StartedAt"]
        jwt.down()
        wait_for(lambda: get(real_node.port) in ((500, None), (502, None)), 30,
                 "Quay's error without a service list for the JWT outage")
        wait_for(lambda: '"health.shared_outage"' in run.log, 30,
                 lambda: "the shared outage; log:\n" + run.log[-3000:])

        def agent_pings() -> int:  # nginx's access log: the agent's pings after a failed probe
            return sum(1 for line in real_node.logs().splitlines()
                       if "GET /v1/_internal_ping" in line and "quay-bootstrap" in line)

        # Eight failed probes answered by pings: four times failure_threshold, were it local.
        wait_for(lambda: agent_pings() >= 8, 60, lambda: "eight pings; log:\n" + run.log[-3000:])
        assert '"container.restarting"' not in run.log
        assert '"instance.marking_unhealthy"' not in run.log
        assert real_node.found().id == first
        jwt.up()
        wait_for(lambda: run.status().get("state") == "healthy", 60, "healthy again")

        # A hung web gunicorn: the ping does not answer either.
        real_node.docker.containers.get(first).exec_run(
            ["pkill", "-STOP", "-f", "gunicorn_web.py"], user="1001")
        wait_for(lambda: '"container.restarting"' in run.log, 60,
                 lambda: "the hung gunicorn restarted; log:\n" + run.log[-3000:])
        wait_for(lambda: run.status().get("state") == "healthy" and get(real_node.port)[0] == 200,
                 240, lambda: "healthy after the restart; log:\n" + run.log[-3000:])
        now = real_node.found()
        assert (now.id, now.attrs["State"]["StartedAt"]) != (first, began)  # Quay started anew
    finally:
        jwt.down()


def test_tls_on_real_quay_8443_serves_and_8080_redirects_probed_as_the_readme_says(
        real_node, testbed):
    """ssl.cert and ssl.key in the stack: Quay serves TLS (here on QB_HTTPS_PORT for 8443), and
    8080 answers only 301s; the agent probes https without verifying (the certificate names
    SERVER_HOSTNAME, never 127.0.0.1) and the node is healthy through `run --once`."""
    https = quay_standin.free_port()
    real_node.backend.upload({
        "config.yaml": real_node.config_yaml(PREFERRED_URL_SCHEME="https"),
        **quay_standin.tls_pair("quay.example.com")})
    env = {**real_quay_env(real_node.port), "QB_HTTPS_PORT": str(https),
           # Quay's self-checks: https://localhost:PORT, not verified (health/services.py).
           "QUAY_OVERRIDE_CONFIG": json.dumps({"SERVER_HOSTNAME": f"localhost:{https}"})}
    real_node.configure(container={"env": env},
                        health={"url": f"https://127.0.0.1:{https}/health/instance"})
    code, _, err = real_node.agent.run("run", "--once")
    assert code == 0, err[-3000:]
    conn = http.client.HTTPConnection("127.0.0.1", real_node.port, timeout=10)
    conn.request("GET", "/health/instance", headers={"Host": "quay.example.com"})
    answer = conn.getresponse()
    assert answer.status == 301 and answer.getheader("Location").startswith("https://quay.example.com")
    conn.close()
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    secure = http.client.HTTPSConnection("127.0.0.1", https, timeout=20, context=context)
    secure.request("GET", "/health/instance")
    reply = secure.getresponse()
    assert (reply.status, json.loads(reply.read())) == (200, INSTANCE_OK)
    secure.close()


def test_rds_aware_health_check_of_real_quay_never_leaves_the_database_out(boots, real_stack, testbed,
                                                            moto_endpoint, tmp_path, real_db,
                                                            quay_bucket):
    """HEALTH_CHECKER RDSAwareHealthCheck, documented to leave the database out while RDS is not
    `available`: on real Quay it never does (health/healthcheck.py tests the truth of a
    (bool, message) tuple, never false). PostgreSQL down: 503 whatever RDS says. The agent
    holds still anyway (the database is a shared service) and its `report.rds` does what Quay
    documents."""
    import boto3

    from tests.testbed import faults

    rds = boto3.client("rds", endpoint_url=moto_endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    name = f"quay-{uuid.uuid4().hex[:8]}"
    rds.create_db_instance(DBInstanceIdentifier=name, Engine="postgres",
                           DBInstanceClass="db.t3.micro", AllocatedStorage=10,
                           MasterUsername="quay", MasterUserPassword="quay-password")
    checker = ["RDSAwareHealthCheck", {"access_key": "testing", "secret_key": "testing",
                                       "region": "us-east-1", "db_instance": name}]
    stack = quay_standin.write_stack(tmp_path / "rds-stack", quay_standin.config(
        testbed, database=real_db, bucket=quay_bucket, HEALTH_CHECKER=checker))
    boot = boots("v3.18.0", stack, env={"AWS_ENDPOINT_URL": moto_endpoint})
    boot.until_200()
    try:
        with faults.down(testbed["dir"], "postgres"):
            available = get(boot.port)
            rds.stop_db_instance(DBInstanceIdentifier=name)
            stopped = get(boot.port)
    finally:
        rds.delete_db_instance(DBInstanceIdentifier=name, SkipFinalSnapshot=True)
    assert available[0] == 503 and available[1]["data"]["services"]["database"] is False
    assert stopped[0] == 503 and stopped[1]["data"]["services"]["database"] is False
    assert "DB reports unhealthy; RDS status" not in boot.logs()  # RDS was never asked
