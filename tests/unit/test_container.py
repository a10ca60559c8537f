"""The desired container and the reconcile decision, from tables."""
from __future__ import annotations

from pathlib import Path

import pytest

from quay_bootstrap.config import ContainerConfig
from quay_bootstrap.container import (
    IMAGE_DIGEST,
    MANAGED,
    SPEC_HASH,
    STACK_VERSION,
    Observed,
    build_spec,
    decide,
    parse_ports,
)


def spec(**container):
    return build_spec(ContainerConfig(**container), "sha256:img", "quay@sha256:abc",
                      Path("/var/lib/quay-bootstrap/stack/versions/v1"), "v1")


def test_documented_defaults_make_the_documented_run():
    desired = spec()
    assert desired.ports == {"8443/tcp": 443, "8080/tcp": 80}
    assert desired.binds[0] == "/var/lib/quay-bootstrap/stack/versions/v1:/conf/stack:ro,Z"
    assert desired.sysctls == {"net.core.somaxconn": "4096"}
    assert desired.image == "sha256:img"
    assert desired.labels[MANAGED] == "true" and desired.labels[STACK_VERSION] == "v1"
    assert desired.labels[IMAGE_DIGEST] == "quay@sha256:abc"


@pytest.mark.parametrize("items,expect", [
    (["443:8443"], {"8443/tcp": 443}),
    (["127.0.0.1:80:8080"], {"8080/tcp": ("127.0.0.1", 80)}),
    (["5353:53/udp"], {"53/udp": 5353}),
])
def test_ports(items, expect):
    assert parse_ports(items) == expect


def test_host_network_publishes_nothing():
    assert spec(network_mode="host", sysctls={}).ports == {}


def test_spec_hash_follows_every_setting_but_not_labels():
    base = spec().labels[SPEC_HASH]
    assert spec().labels[SPEC_HASH] == base
    for change in ({"env": {"A": "1"}}, {"ports": ["8443:8443"]}, {"privileged": True},
                   {"volumes": ["/data:/datastorage"]}, {"stop_timeout": 60}):
        assert spec(**change).labels[SPEC_HASH] != base, change


def observed(status="running", **labels):
    desired = spec()
    return Observed("c1", status, {**desired.labels, **labels})


@pytest.mark.parametrize("found,adopt,kind,reason", [
    (None, False, "create", "no container named quay"),
    (observed(), False, "adopt", "already running"),
    (observed("restarting"), False, "adopt", "already running"),
    (observed("exited"), False, "start", "exited"),
    (observed("created"), False, "start", "created"),
    (observed(**{IMAGE_DIGEST: "quay@sha256:old"}), False, "replace", "changed: image"),
    (observed(**{STACK_VERSION: "v0"}), False, "replace", "changed: stack version"),
    (observed(**{SPEC_HASH: "x", STACK_VERSION: "v0"}), False, "replace",
     "changed: stack version, container spec"),
    (Observed("c1", "running", {}), False, "refuse", "did not create"),
    (Observed("c1", "running", {MANAGED: "false"}), False, "refuse", "did not create"),
    (Observed("c1", "running", {}), True, "replace", "adopt_unmanaged"),
])
def test_decide(found, adopt, kind, reason):
    action = decide(found, spec(), adopt)
    assert action.kind == kind and reason in action.reason
