"""Three agents on REAL Quay (tests/testbed/real_quay.py) sharing one PostgreSQL database (behind
a SlowProxy), Redis, a SeaweedFS bucket and the stack's object-store prefix: the first start of
an empty database, the upgrade v3.17.4 -> v3.18.0 through the canary (5 real migrations), and
PostgreSQL stopped, hung and slowed. The harness is the stand-in cluster's (cluster.py); the
sampler probes every 0.5 s (real Quay's /health/instance runs its self-checks and a database
query on each probe: one worker per gunicorn here).
"""
from __future__ import annotations

import contextlib
import json
import time

import pytest

from tests.integration.cluster import (
    RealClusterNode,
    passed,
    restarts_and_marks,
    running_cluster,
    sighup,
    trouble,
    wait_all,
)
from tests.integration.conftest import wait_for
from tests.testbed import faults, quay_standin, real_quay

SAMPLING = {"period": 0.5, "timeout": 5.0}
# How long PostgreSQL is slowed (60 s, as the stand-in's cluster test), stopped or hung.
OUTAGE_SECONDS = {"slow": 60, "stopped": 30, "hung": 30}


@pytest.fixture(autouse=True)
def _needs_real_quay(real_images):
    """Skipped, saying why, where ../shared/quay is absent (never in CI: conftest.real_images)."""


def open_cluster(request, **kwargs):
    fixtures = {name: request.getfixturevalue(name) for name in (
        "s3", "s3_bucket", "s3_backend", "docker_client", "testbed", "tmp_path", "monkeypatch",
        "moto_endpoint")}
    return running_cluster(images=request.getfixturevalue("real_images"),
                           database=request.getfixturevalue("real_db"),
                           bucket=request.getfixturevalue("quay_bucket"), kind=RealClusterNode,
                           boot=300, sampling=SAMPLING, **fixtures, **kwargs)


def report(name: str, **figures) -> None:
    print(json.dumps({"test": name, **figures}, default=str))


def migrations(node) -> int:
    return node.quay_logs_all().count("Running upgrade")


def quiet(nodes) -> None:
    for node in nodes:
        assert restarts_and_marks(node) == (0, 0), (node.name, trouble(node))


def test_a_first_start_on_an_empty_database_migrates_on_one_node_only(request):
    """All three agents start at once on an empty database: the canary gate lets one node start
    v3.17.4 first (it runs all 119 migrations); the others wait for its verdict."""
    head, count = real_quay.heads("v3.17.4")
    began = time.time()
    with open_cluster(request, tag="v3.17.4", together=True) as cluster:
        took = time.time() - began
        per_node = {n.name: migrations(n) for n in cluster.nodes}
        report("real: first start", seconds=round(took, 1), migrations=per_node)
        assert sorted(per_node.values()) == [0, 0, count], per_node
        assert quay_standin.db_revision(cluster.nodes[0].database) == head
        canaries = [n.name for n in cluster.nodes if n.events("rollout.canary")]
        waited = [n.name for n in cluster.nodes if n.events("rollout.waiting_for_canary")]
        migrated = [name for name, done in per_node.items() if done]
        assert canaries == migrated, (canaries, migrated)
        assert sorted(waited) == sorted(set(per_node) - set(migrated)), waited
        quiet(cluster.nodes)


def test_an_upgrade_through_the_canary_and_a_killed_old_node_coming_back_without_migrating(request):
    """v3.17.4 -> v3.18.0: the first node upgraded is the canary and runs the 5 migrations while
    the other two keep serving v3.17.4; one of those, killed then, comes back with
    `registry-nomigrate` (never alembic's "Can't locate revision"); then the rest roll, one at
    a time."""
    old_head, _ = real_quay.heads("v3.17.4")
    head, count = real_quay.heads("v3.18.0")
    with open_cluster(request, tag="v3.17.4") as cluster:
        nodes = cluster.nodes
        began = time.time()
        nodes[0].setup(image_tag="v3.18.0")
        sighup(nodes[:1])
        wait_for(lambda: passed(cluster.upgrade("v3.18.0")), 300,
                 lambda: "the canary's verdict; log:\n" + nodes[0].log()[-4000:])
        canary_done = time.time()
        assert quay_standin.db_revision(nodes[0].database) == head
        upgraded = [line for line in nodes[0].quay_logs_all().splitlines()
                    if "Running upgrade" in line]
        assert len(upgraded) == count - real_quay.heads("v3.17.4")[1] == 5, upgraded
        assert f"Running upgrade {old_head} ->" in upgraded[0]
        for node in nodes[1:]:  # served v3.17.4 all along
            assert node.found().image.id == node.image_id("v3.17.4")
            assert node.serving(timeout=5)
        # A v3.17.4 node's Quay killed now: the database is ahead of its image.
        victim = nodes[1]
        killed = victim.found().id
        victim.docker.api.kill(killed)
        # found() once per check: the agent may remove the container between two reads.
        wait_for(lambda: (back := victim.found()) is not None and back.id != killed
                 and victim.serving(timeout=5), 240,
                 lambda: "the killed node serving again; log:\n" + victim.log()[-4000:])
        back = victim.found()
        assert back.attrs["Config"]["Cmd"] == ["registry-nomigrate"], back.attrs["Config"]["Cmd"]
        assert back.image.id == victim.image_id("v3.17.4")
        assert "Can't locate revision" not in victim.quay_logs_all()
        # The rest of the cluster rolls forward.
        rolled_at = time.time()
        for node in nodes[1:]:
            node.setup(image_tag="v3.18.0")
        sighup(nodes[1:])
        wait_all(lambda n: (now := n.found()) is not None and now.image.id == n.image_id("v3.18.0")
                 and n.agent_run.status().get("state") == "healthy" and n.serving(timeout=5),
                 nodes, 600, "every node on v3.18.0")
        ended = time.time()
        worst = cluster.sampler.worst(began)
        report("real: upgrade v3.17.4 -> v3.18.0", canary_seconds=round(canary_done - began, 1),
               roll_seconds=round(ended - rolled_at, 1), total_seconds=round(ended - began, 1),
               worst_down=worst[0])
        assert worst[0] <= 1, worst
        assert sum(line.count("Running upgrade") for line in
                   (n.quay_logs_all() for n in nodes[1:])) == 0  # only the canary migrated
        assert quay_standin.db_revision(nodes[0].database) == head
        for node in nodes:
            assert restarts_and_marks(node)[1] == 0, trouble(node)


@pytest.mark.parametrize("fault", ["stopped", "hung", "slow"])
def test_postgresql_stopped_hung_or_slow_restarts_nothing_and_marks_nothing(request, fault):
    """Every node's /health/instance fails at once (503 database:false: 14 ms when PostgreSQL is
    stopped, 3 s when it hangs, Quay's connect timeout when every round trip takes 8 s): a
    shared outage. No restart, no mark; every node answers 200 again once it returns."""
    with open_cluster(request, tag="v3.18.0") as cluster:
        nodes = cluster.nodes
        ids = {n.name: n.found().id for n in nodes}
        began = time.time()
        bed = cluster.testbed["dir"]
        with contextlib.ExitStack() as outage:
            if fault == "slow":
                cluster.proxy.delay = 8.0
                outage.callback(setattr, cluster.proxy, "delay", 0.0)
            else:
                outage.enter_context((faults.down if fault == "stopped" else faults.hung)(
                    bed, "postgres"))
            wait_for(lambda: cluster.sampler.worst(began)[0] == 3, 60, "every node failing")
            time.sleep(max(0.0, began + OUTAGE_SECONDS[fault] - time.time()))
        ended = time.time()
        wait_all(lambda n: n.serving(timeout=5) and n.agent_run.status().get("state") == "healthy",
                 nodes, 90, "every node healthy again")
        report(f"real: PostgreSQL {fault}", worst_down=cluster.sampler.worst(began, ended)[0],
               recovered_after=round(time.time() - ended, 1))
        quiet(nodes)
        assert {n.name: n.found().id for n in nodes} == ids
        assert set(cluster.health_statuses().values()) == {"HEALTHY"}
