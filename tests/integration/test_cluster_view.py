"""`quay-bootstrap cluster` on moto, SeaweedFS and fake-gcs-server: node records written by the
recorder on the real store, the published version, stale nodes, and `--wait`."""
from __future__ import annotations

import json
import time

import pytest

from quay_bootstrap.config import load_config
from quay_bootstrap.node_record import STALE_AFTER, NodeRecorder
from quay_bootstrap.stores import open_leases
from quay_bootstrap.stores.put import uploader
from tests.integration.test_publish import (  # noqa: F401 - fixtures
    fake_gcs_backend,
    folder,
    publish,
    version_of,
)
from tests.testbed.stacks import sample_stack

pytest_plugins = ["tests.integration.stores_fixtures"]


@pytest.fixture(params=["s3", "fake_gcs", "seaweedfs"])
def store(request):
    return request.getfixturevalue(f"{request.param}_backend")


def recorder(agent, name: str, clock=time.time) -> NodeRecorder:
    cfg = load_config(agent.config_path, lambda values: None)
    return NodeRecorder(uploader(open_leases(cfg.stack)), name, clock, spawn=lambda fn: fn())


def cluster(agent, *more):
    code, out, err = agent.run("cluster", *more)
    return code, out, err


def test_the_cluster_shows_every_node_and_is_ok_once_all_run_the_published_version(agent, store,
                                                                                 tmp_path):
    agent.write_config(store)
    files = sample_stack()
    assert publish(agent, folder(tmp_path, files))[0] == 0
    version = version_of(files)
    recorder(agent, "i-1:quay").tend({"state": "healthy", "stack_version": version})
    behind = recorder(agent, "i-2:quay")
    behind.tend({"state": "healthy", "stack_version": "0" * 64})
    # A node silent for 3 intervals: shown as stale, not counted.
    recorder(agent, "i-3:quay", clock=lambda: time.time() - STALE_AFTER - 60).tend(
        {"state": "failing", "stack_version": version})

    code, out, err = cluster(agent, "--json")
    doc = json.loads(out)
    assert code == 1, err
    assert doc["target"] == version and doc["published"]["serial"] == 1
    nodes = {n["name"]: n for n in doc["nodes"]}
    assert set(nodes) == {"i-1:quay", "i-2:quay", "i-3:quay"}
    assert nodes["i-1:quay"]["healthy"] and nodes["i-1:quay"]["on_target"]
    assert not nodes["i-2:quay"]["on_target"] and nodes["i-3:quay"]["stale"]

    behind.tend({"state": "healthy", "stack_version": version})  # a change: written at once
    code, out, _ = cluster(agent)
    assert code == 0, out
    assert "STALE" in next(line for line in out.splitlines() if line.startswith("i-3:quay"))
    assert f"published: {version[:12]} (serial 1" in out


def test_wait_returns_as_soon_as_the_cluster_is_ok_and_fails_at_its_timeout(agent, store):
    agent.write_config(store)
    recorder(agent, "i-1:quay").tend({"state": "starting", "stack_version": "a" * 64})
    began = time.monotonic()
    code, out, _ = cluster(agent, "--wait", "3s")
    assert code == 1 and time.monotonic() - began >= 3 and "NOT ok" in out
    recorder(agent, "i-1:quay").tend({"state": "healthy", "stack_version": "a" * 64})
    code, out, _ = cluster(agent, "--wait", "60s")
    assert code == 0 and out.splitlines()[-1].startswith("ok:")
