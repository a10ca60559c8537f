"""The stand-in against real Quay: the same probes on both (healthy, PostgreSQL down, PostgreSQL
hung, an older image on a migrated database, registry-nomigrate, SIGTERM), and every answer the
agent decides from compared. They must agree except where the stand-in documents otherwise
(DOCUMENTED): it is only as good as its calibration.
"""
from __future__ import annotations

import time

import pytest

from tests.integration.conftest import real_quay_env
from tests.integration.test_real_quay import get
from tests.testbed import faults, quay_standin

# What the stand-in does differently, on purpose (tests/testbed/standin/registry.py says why).
DOCUMENTED = {
    "sigterm_seconds": "the stand-in stops at once; real Quay's supervisord takes 19-38 s",
    "cold_seconds": "the stand-in's migrations take QUAY_STANDIN_MIGRATION_SECONDS each",
}
# (newer, older) release of each: the older one on the newer one's database.
RELEASES = {"standin": ("v3.11.0", "v3.10.0"), "real": ("v3.18.0", "v3.17.4")}


class Quay:
    """One implementation's images and how to run them on the bed's services."""

    def __init__(self, kind: str, images, docker_client, testbed, tmp_path, database, bucket):
        self.kind, self.images, self.docker, self.bed = kind, images, docker_client, testbed
        self.stack = quay_standin.write_stack(tmp_path / f"stack-{kind}", quay_standin.config(
            testbed, database=database, bucket=bucket))
        self.made = []

    def start(self, tag: str, command: str = "registry"):
        port = quay_standin.free_port()
        if self.kind == "standin":
            container = quay_standin.start(self.docker, self.images[tag], self.stack,
                                           http_port=port, command=command, migration_seconds=0)
        else:
            container = self.docker.containers.run(
                self.images[tag], [command], network_mode="host", detach=True,
                environment=real_quay_env(port),
                volumes={str(self.stack): {"bind": "/conf/stack", "mode": "ro"}})
        container.http_port = port
        self.made.append(container)
        return container

    def serving(self, container, timeout: float = 240) -> float:
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if get(container.http_port, timeout=10)[0] == 200:
                return time.monotonic() - began
            container.reload()
            assert container.status != "exited", quay_standin.logs(container)[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"{self.kind}: no 200 in {timeout} s")

    def cleanup(self) -> None:
        for container in self.made:
            try:
                container.remove(force=True, v=True)
            except Exception:  # noqa: BLE001 - docker.errors.NotFound
                pass


def failing(answer) -> tuple:
    status, body = answer
    services = (body or {}).get("data", {}).get("services", {}) if isinstance(body, dict) else {}
    return status, tuple(sorted(k for k, v in services.items() if not v)), tuple(sorted(services))


def observe(quay: Quay, testbed) -> dict:
    """Every answer the agent decides from, for one implementation."""
    seen = {}
    newer, older = RELEASES[quay.kind]
    first = quay.start(newer)
    seen["cold_seconds"] = round(quay.serving(first), 1)
    seen["healthy"] = failing(get(first.http_port))
    with faults.down(testbed["dir"], "postgres"):
        seen["postgres_down"] = failing(get(first.http_port))
    quay.serving(first, 60)
    with faults.hung(testbed["dir"], "postgres"):
        began = time.monotonic()
        answer = get(first.http_port)
        # Quay's database check gives up after its 3 s connect timeout (data/model/health.py).
        seen["postgres_hung"] = (*failing(answer), round(time.monotonic() - began) >= 3)
    quay.serving(first, 60)
    stale = quay.start(older)
    code = stale.wait(timeout=180)["StatusCode"]
    seen["older_on_migrated"] = (code, "Can't locate revision identified by" in
                                 quay_standin.logs(stale))
    nomigrate = quay.start(older, "registry-nomigrate")
    quay.serving(nomigrate)
    seen["nomigrate"] = (failing(get(nomigrate.http_port)),
                         "runmigration.sh" in quay_standin.logs(nomigrate))
    began = time.monotonic()
    first.stop(timeout=300)
    first.reload()
    seen["sigterm_exit"] = first.attrs["State"]["ExitCode"]
    seen["sigterm_seconds"] = round(time.monotonic() - began, 1)
    return seen


@pytest.fixture
def implementations(docker_client, standin_images, real_images, testbed, tmp_path, quay_bucket):
    made = {}
    databases = []
    try:
        for kind, images in (("standin", standin_images), ("real", real_images)):
            database = quay_standin.create_database(testbed)
            databases.append(database)
            if kind == "real":
                import psycopg2

                conn = psycopg2.connect(database, connect_timeout=5)
                conn.autocommit = True
                conn.cursor().execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
                conn.close()
            made[kind] = Quay(kind, images, docker_client, testbed, tmp_path, database, quay_bucket)
        yield made
    finally:
        for quay in made.values():
            quay.cleanup()
        for database in databases:
            quay_standin.drop_database(testbed, database)


def test_the_stand_in_answers_as_real_quay_does(implementations, testbed):
    seen = {kind: observe(quay, testbed) for kind, quay in implementations.items()}
    print(seen)
    standin, real = seen["standin"], seen["real"]
    differ = {key: (standin[key], real[key]) for key in real
              if standin[key] != real[key] and key not in DOCUMENTED}
    assert differ == {}, differ
    # What the agent relies on, stated for both.
    assert real["healthy"][:2] == (200, ())
    assert real["postgres_down"][:2] == real["postgres_hung"][:2] == (503, ("database",))
    assert real["older_on_migrated"] == (255, True)
    assert real["nomigrate"] == (real["healthy"], False)
    assert real["sigterm_exit"] == 0
