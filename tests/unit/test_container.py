"""The desired container and the reconcile decision, from tables."""
from __future__ import annotations

from dataclasses import replace
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
    health_url,
    parse_ports,
    plan_recovery,
)
from quay_bootstrap.errors import ConfigError


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


def test_host_network_publishes_nothing_and_sets_no_net_sysctls():
    desired = spec(network_mode="host")
    assert desired.ports == {} and desired.sysctls == {}


@pytest.mark.parametrize("container, tls, url", [
    ({}, False, "http://127.0.0.1:80/health/instance"),
    ({}, True, "https://127.0.0.1:443/health/instance"),
    ({"network_mode": "host"}, False, "http://127.0.0.1:8080/health/instance"),
    ({"network_mode": "host"}, True, "https://127.0.0.1:8443/health/instance"),
    ({"ports": ["10.0.0.5:8000:8080"]}, False, "http://10.0.0.5:8000/health/instance"),
    ({"ports": ["0.0.0.0:8000:8080", "443:8443"]}, False, "http://127.0.0.1:8000/health/instance"),
])
def test_the_default_probe_url_follows_the_scheme_and_the_port_mapping(tmp_path, container, tls,
                                                                        url):
    if tls:
        (tmp_path / "ssl.key").write_text("key")
    assert health_url(ContainerConfig(**container), tmp_path) == url


def test_an_unpublished_quay_port_is_a_config_error_naming_it(tmp_path):
    (tmp_path / "ssl.key").write_text("key")
    with pytest.raises(ConfigError, match="HTTPS on 8443") as caught:
        health_url(ContainerConfig(ports=["80:8080"]), tmp_path)
    assert caught.value.exit_code == 78 and "health.url" in caught.value.hint


def test_spec_hash_follows_every_setting_but_labels_and_the_stop_timeout():
    base = spec().labels[SPEC_HASH]
    assert spec().labels[SPEC_HASH] == base
    for change in ({"env": {"A": "1"}}, {"ports": ["8443:8443"]}, {"privileged": True},
                   {"volumes": ["/data:/datastorage"]}):
        assert spec(**change).labels[SPEC_HASH] != base, change
    # The agent passes its own timeout on every stop: a new one replaces no Quay.
    assert spec(stop_timeout=60).labels[SPEC_HASH] == base


def test_a_quay_an_older_agent_made_with_its_stop_timeout_in_the_hash_is_not_drift():
    """Agents before 90 s hashed the stop timeout (their default 30 s): upgrading the agent
    must not replace every node's Quay."""
    import hashlib
    import json
    from dataclasses import asdict

    desired = spec()
    for timeout in (30, int(desired.stop_timeout)):
        old = asdict(replace(desired, stop_timeout=timeout))  # the older agent's digest
        old.pop("labels")
        if old["command"] is None:
            old.pop("command")
        old["binds"] = [b for b in old["binds"] if ":/conf/stack:" not in b]
        legacy = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
        found = Observed("c1", "running", {**desired.labels, SPEC_HASH: legacy})
        assert decide(found, desired).kind == "adopt", timeout
    other = replace(spec(env={"A": "1"}), stop_timeout=30).digest(30)
    assert decide(Observed("c1", "running", {**desired.labels, SPEC_HASH: other}),
                  desired).kind == "replace"


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


def _found(status, managed=True):
    return Observed("id-" + status, status, {MANAGED: "true"} if managed else {})


# A replacement: stop old, rename it NAME-previous-T, create new, start new, remove old. Killed
# anywhere in between, the next start must leave a Quay.
@pytest.mark.parametrize("current, asides, restore, remove", [
    # killed after the rename, before the create: the aside one is the only Quay
    (None, {"quay-previous-100": _found("exited")}, "quay-previous-100", []),
    # two interrupted replacements: the newest aside comes back, the older goes
    (None, {"quay-previous-100": _found("exited"), "quay-previous-200": _found("exited")},
     "quay-previous-200", ["quay-previous-100"]),
    # the new one is created but not running yet: keep the aside, it may be needed
    (_found("created"), {"quay-previous-100": _found("exited")}, None, []),
    # the new one runs: the aside is stale
    (_found("running"), {"quay-previous-100": _found("exited")}, None, ["quay-previous-100"]),
    # a stranger's container is never touched
    (None, {"quay-previous-100": _found("exited", managed=False)}, None, []),
    (None, {}, None, []),
])
def test_recovery_from_a_replacement_cut_off_half_way(current, asides, restore, remove):
    assert plan_recovery(current, asides) == (restore, remove)
