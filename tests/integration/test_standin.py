"""The stand-in Quay behaves like Quay on the bed's real PostgreSQL, Redis and SeaweedFS."""

from __future__ import annotations

import http.client
import json
import ssl
import time
import uuid
from pathlib import Path

import pytest

from tests.testbed import faults
from tests.testbed import quay_standin as qs

INSTANCE_OK = {"data": {"services": {"auth": True, "database": True, "disk_space": True,
                                     "registry_gunicorn": True, "service_key": True,
                                     "web_gunicorn": True}},
               "status_code": 200}


# standin_images, quay_db and quay_bucket: tests/integration/conftest.py


class StandIns:
    """Starts stand-ins for one test and removes them (with their volumes) afterwards."""

    def __init__(self, docker_client, images, testbed, tmp_path: Path, db: str, bucket: str):
        self.docker, self.images, self.bed, self.tmp = docker_client, images, testbed, tmp_path
        self.db, self.bucket = db, bucket
        self.made = []

    def config(self, **overrides):
        return qs.config(self.bed, database=self.db, bucket=self.bucket, **overrides)

    def start(self, tag="v3.11.0", conf=None, files=None, **kwargs):
        stack = self.tmp / f"stack-{uuid.uuid4().hex[:6]}"
        qs.write_stack(stack, conf if conf is not None else self.config(), files)
        kwargs.setdefault("http_port", qs.free_port())
        kwargs.setdefault("control_dir", self.tmp / "control")
        container = qs.start(self.docker, self.images[tag], stack, **kwargs)
        container.http_port = kwargs["http_port"]
        self.made.append(container)
        return container

    def cleanup(self):
        for container in self.made:
            try:
                container.remove(force=True, v=True)
            except Exception:  # noqa: BLE001 - docker.errors.NotFound
                pass


@pytest.fixture
def standins(docker_client, standin_images, testbed, tmp_path, quay_db, quay_bucket):
    made = StandIns(docker_client, standin_images, testbed, tmp_path, quay_db, quay_bucket)
    yield made
    made.cleanup()


def get(port: int, path: str = "/health/instance", timeout: float = 15, tls: bool = False):
    """(status, parsed JSON or None, Location header, seconds taken); no redirect is followed."""
    if tls:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    began = time.monotonic()
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        body = answer.read()
        parsed = json.loads(body) if answer.getheader("Content-Type") == "application/json" else None
        return answer.status, parsed, answer.getheader("Location"), time.monotonic() - began
    finally:
        conn.close()


def test_fresh_database_is_migrated_and_instance_health_is_quays(standins, quay_db, docker_client):
    quay = standins.start("v3.11.0", migration_seconds=0.2)
    qs.wait_serving(quay)

    status, body, _, _ = get(quay.http_port)
    assert (status, body) == (200, INSTANCE_OK)
    status, body, _, _ = get(quay.http_port, "/health/endtoend")
    assert (status, body) == (200, {"data": {"services": {"auth": True, "database": True,
                                                           "redis": True, "storage": True}},
                                    "status_code": 200})
    assert qs.db_revision(quay_db) == qs.HEADS["v3.11.0"]
    log = qs.logs(quay)
    assert log.index("Validating Configuration") < log.index("Running upgrade <base> -> 0cdd1f27a450")
    assert "Running upgrade 946f0e90f9c9 -> b4da5b09c8df" in log
    image = docker_client.images.get(standins.images["v3.11.0"]).attrs["Config"]
    assert image["User"] == "1001"
    assert set(image["Volumes"]) == {"/datastorage", "/tmp", "/conf/stack"}
    assert set(image["ExposedPorts"]) == {"8080/tcp", "8443/tcp"}
    assert image["Cmd"] == ["registry"]


def test_stopped_postgresql_ends_the_start_at_validation(standins, testbed):
    with faults.down(testbed["dir"], "postgres"):
        quay = standins.start("v3.11.0")
        assert qs.wait_exit(quay, timeout=30) == 1
    log = qs.logs(quay)
    assert "| Database" in log and "Could not connect to database. Error:" in log
    assert "runmigration.sh" not in log


def test_older_image_cannot_start_on_a_database_a_newer_one_migrated(standins, quay_db):
    newer = standins.start("v3.11.0")
    qs.wait_serving(newer)
    newer.remove(force=True, v=True)

    older = standins.start("v3.10.0")

    assert qs.wait_exit(older, timeout=30) == 255  # as real Quay
    assert "Can't locate revision identified by 'b4da5b09c8df'" in qs.logs(older)
    assert qs.db_revision(quay_db) == qs.HEADS["v3.11.0"]
    # registry-nomigrate skips the step that fails.
    nomigrate = standins.start("v3.10.0", command="registry-nomigrate")
    qs.wait_serving(nomigrate)
    assert get(nomigrate.http_port)[0] == 200
    assert "runmigration.sh" not in qs.logs(nomigrate)


def test_setup_complete_false_ends_the_start(standins):
    quay = standins.start("v3.9.0", conf=standins.config(SETUP_COMPLETE=False))

    assert qs.wait_exit(quay, timeout=30) == 1
    assert ("Your configuration bundle is either not mounted or setup has not been completed"
            in qs.logs(quay))


def test_https_without_the_certificate_pair_fails_validation(standins):
    quay = standins.start("v3.11.0", conf=standins.config(PREFERRED_URL_SCHEME="https"))

    assert qs.wait_exit(quay, timeout=30) == 1
    log = qs.logs(quay)
    assert "Certificate ssl.cert is required for HostSettings" in log
    assert "runmigration.sh" not in log


def test_https_serves_8443_and_8080_only_redirects(standins):
    https_port = qs.free_port()
    quay = standins.start("v3.11.0", conf=standins.config(PREFERRED_URL_SCHEME="https"),
                          files=qs.tls_pair("quay.example.com"), https_port=https_port)
    qs.wait_serving(quay)

    status, body, location, _ = get(quay.http_port)
    assert status == 301 and location == "https://quay.example.com/health/instance"
    status, body, _, _ = get(https_port, tls=True)
    assert (status, body) == (200, INSTANCE_OK)


def test_slow_database_makes_instance_health_slow(standins, testbed):
    with faults.SlowProxy(("127.0.0.1", testbed["postgres_port"]), delay=0) as proxy:
        db = standins.db.replace(f":{testbed['postgres_port']}/", f":{proxy.port}/")
        quay = standins.start("v3.11.0", conf=standins.config(DB_URI=db))
        qs.wait_serving(quay)
        fast = get(quay.http_port)
        proxy.delay = 0.7

        status, body, _, took = get(quay.http_port)

    assert fast[0] == 200 and fast[3] < 1.0
    # Connect, SET LOCAL statement_timeout, SELECT: three round trips, each 0.7 s later.
    assert (status, body) == (200, INSTANCE_OK)
    assert took >= 2.0


def test_hung_database_fails_instance_health_after_the_connect_timeout(standins, testbed):
    quay = standins.start("v3.11.0")
    qs.wait_serving(quay)

    with faults.hung(testbed["dir"], "postgres"):
        status, body, _, took = get(quay.http_port)

    assert status == 503 and body["data"]["services"]["database"] is False
    assert body["data"]["services"]["web_gunicorn"] is True
    assert 3.0 <= took < 6.0  # Quay's 3 s connect timeout, then the other checks


def test_failed_or_hung_local_service_fails_only_this_node(standins, tmp_path):
    quay = standins.start("v3.11.0")
    qs.wait_serving(quay)

    qs.set_local(tmp_path / "control", "registry_gunicorn", "fail")
    status, body, _, _ = get(quay.http_port)
    assert status == 503
    assert body["data"]["services"] == {**INSTANCE_OK["data"]["services"], "registry_gunicorn": False}
    assert body["status_code"] == 503

    qs.set_local(tmp_path / "control", "registry_gunicorn", "hang")
    status, body, _, took = get(quay.http_port)
    assert status == 503 and body["data"]["services"]["registry_gunicorn"] is False
    assert took >= 2.0  # the gunicorn check's 2 s timeout

    qs.set_local(tmp_path / "control", "registry_gunicorn", None)
    qs.set_local(tmp_path / "control", "web_gunicorn", "hang")
    with pytest.raises(TimeoutError):
        get(quay.http_port, timeout=1.5)  # the hung web worker serves /health itself
    qs.set_local(tmp_path / "control", "web_gunicorn", None)
    assert get(quay.http_port)[0] == 200


def test_migration_killed_half_way_breaks_the_next_start_until_repaired(standins, quay_db):
    quay = standins.start("v3.10.0", migration_seconds=4)
    deadline = time.monotonic() + 30
    while "Running upgrade <base>" not in qs.logs(quay) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # inside the first step: its table exists, the revision is not yet written
    quay.kill()

    again = standins.start("v3.10.0", migration_seconds=0)
    assert qs.wait_exit(again, timeout=30) == 1
    assert 'relation "standin_v3_9_0" already exists' in qs.logs(again)
    assert qs.db_revision(quay_db) is None

    assert qs.repair(quay_db)
    fixed = standins.start("v3.10.0", migration_seconds=0)
    qs.wait_serving(fixed)
    assert qs.db_revision(quay_db) == qs.HEADS["v3.10.0"]


def test_preferred_storage_is_reported_when_configured(standins):
    conf = standins.config(HEALTH_CHECKER_INSTANCE_CHECK_PREFERRED_STORAGE=True)
    quay = standins.start("v3.11.0", conf=conf)
    qs.wait_serving(quay)

    status, body, _, _ = get(quay.http_port)
    assert status == 200
    assert body["data"]["services"] == {**INSTANCE_OK["data"]["services"], "preferred_storage": True}


def test_rds_aware_check_counts_the_database_whatever_rds_says_as_real_quay_does(standins, testbed,
                                                                          moto_endpoint):
    import boto3

    rds = boto3.client("rds", endpoint_url=moto_endpoint, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    db_name = f"quay-{uuid.uuid4().hex[:8]}"
    rds.create_db_instance(DBInstanceIdentifier=db_name, Engine="postgres",
                           DBInstanceClass="db.t3.micro", AllocatedStorage=10,
                           MasterUsername="quay", MasterUserPassword="quay-password")
    checker = ["RDSAwareHealthCheck", {"access_key": "testing", "secret_key": "testing",
                                       "region": "us-east-1", "db_instance": db_name}]
    quay = standins.start("v3.11.0", conf=standins.config(HEALTH_CHECKER=checker),
                          env={"AWS_ENDPOINT_URL": moto_endpoint})
    qs.wait_serving(quay)
    try:
        with faults.down(testbed["dir"], "postgres"):
            available = get(quay.http_port)
            rds.stop_db_instance(DBInstanceIdentifier=db_name)
            stopped = get(quay.http_port)
    finally:
        rds.delete_db_instance(DBInstanceIdentifier=db_name, SkipFinalSnapshot=True)

    # As real Quay (test_real_quay.py): RDSAwareHealthCheck never leaves the database out (it
    # tests a (bool, message) tuple's truth), so 503 whatever RDS says. The agent's own
    # `report.rds` does what Quay documents.
    assert available[0] == 503 and available[1]["data"]["services"]["database"] is False
    assert stopped[0] == 503 and stopped[1]["data"]["services"]["database"] is False


def test_two_nodes_migrating_at_once_collide(standins, quay_db):
    # No lock between nodes (data/migrations/env.py): both run the same DDL and one of them fails.
    first = standins.start("v3.11.0", migration_seconds=1)
    second = standins.start("v3.11.0", migration_seconds=1)

    codes = sorted(qs.wait_exit(c, timeout=30) if _exits(c) else 0 for c in (first, second))

    assert codes == [0, 1]
    failed = first if _exits(first) else second
    assert "sqlalchemy.exc.ProgrammingError" in qs.logs(failed)
    assert "already exists" in qs.logs(failed) or "duplicate key" in qs.logs(failed)


def _exits(container, within: float = 20) -> bool:
    """True when CONTAINER stops within WITHIN seconds, False once it serves."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        container.reload()
        if container.status in ("exited", "dead"):
            return True
        if "serving on" in qs.logs(container):
            return False
        time.sleep(0.1)
    raise AssertionError(f"neither served nor exited:\n{qs.logs(container)}")
