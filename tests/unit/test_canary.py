"""The canary's records and the entry point the shared database allows, from tables."""
from __future__ import annotations

import pytest

from quay_bootstrap.canary import (
    FAILED_AFTER,
    FAILED_BEFORE,
    HEALTHY,
    MIGRATING,
    NOMIGRATE,
    Verdicts,
    entry_point,
    migrated_in,
    version_of,
)
from tests.fakes import FakeClock, MemoryLeases


@pytest.mark.parametrize("image, tag, migrated, entry", [
    ("img-a", "v3.9.0", None, MIGRATING),  # a database no canary recorded
    ("img-a", "v3.9.0", {"image": "img-a", "tag": "v3.9.0"}, MIGRATING),  # its own
    ("img-b", "v3.10.0", {"image": "img-a", "tag": "v3.9.0"}, MIGRATING),  # newer: it migrates
    ("img-a", "v3.9.0", {"image": "img-b", "tag": "v3.10.0"}, NOMIGRATE),  # older: must not
    ("img-c", "v3.9.0", {"image": "img-a", "tag": "v3.9.0"}, MIGRATING),  # a rebuild, same release
    ("img-a", "", {"image": "img-b", "tag": "v3.10.0"}, NOMIGRATE),  # unknown: the safe way
])
def test_an_older_image_never_starts_with_the_migrating_entry_point(image, tag, migrated, entry):
    assert entry_point(image, tag, migrated) == entry


def test_versions_order_numerically():
    assert version_of("v3.10.0") > version_of("v3.9.0") and version_of("3.11.2-rc1") == (3, 11, 2)
    assert version_of("latest") is None


INIT = "Running init script '/quay-registry/conf/init/{}'\n"
# Quay's own lines, as real Quay v3.18.0 printed them (tests/integration/test_real_quay.py).
VALIDATION_FAILED = INIT.format("certs_install.sh") + INIT.format("d_validate_config_bundle.sh") + \
    "Validating Configuration\ntime=\"...\" level=fatal msg=\"...\"\n"
MIGRATION_FAILED = INIT.format("nginx_conf_create.sh") + INIT.format("runmigration.sh") + \
    "INFO  [alembic.runtime.migration] Running upgrade 3f8e3657bb67 -> 9fa37f66a9b6\n"


@pytest.mark.parametrize("logs, exited, migrated", [
    (VALIDATION_FAILED, True, False),  # ended in validation: the database was not touched
    (INIT.format("nginx_conf_create.sh"), True, False),
    (MIGRATION_FAILED, True, True),
    (MIGRATION_FAILED + INIT.format("supervisord_conf_create.sh") + INIT.format("zz_boot.sh"),
     True, True),  # crashed right after migrating: the verdict must not hang on one line
    (INIT.format("zz_boot.sh"), True, True),  # the migration's lines cut off by the log tail
    ("", True, True),  # no log at all: in doubt, migrated
    ("some unknown line\n", True, True),
    (VALIDATION_FAILED, False, True),  # still running: it may be migrating right now
    # Docker restarted it: the logs hold every run. The first reached its migration (exit 255),
    # the second was read while in its first scripts.
    (MIGRATION_FAILED + INIT.format("certs_install.sh"), True, True),
    (VALIDATION_FAILED + VALIDATION_FAILED, True, False),
])
def test_only_a_start_that_certainly_ended_before_quay_s_migration_did_not_migrate(logs, exited, migrated):
    assert migrated_in(logs, exited=exited) is migrated


def test_the_database_record_only_moves_to_newer_versions():
    leases, clock = MemoryLeases(), FakeClock()
    verdicts = Verdicts(leases, "node-a", clock.sleep, clock)
    verdicts.migrating("img-b", "v3.10.0")
    assert verdicts.migrated()["image"] == "img-b"
    verdicts.migrating("img-a", "v3.9.0")  # an older start never moves it back
    assert verdicts.migrated()["image"] == "img-b"
    verdicts.migrating("img-c", "v3.11.0")
    assert verdicts.migrated()["tag"] == "v3.11.0"


@pytest.mark.parametrize("state, verdict", [(HEALTHY, "go"), (FAILED_AFTER, "stop"),
                                            (FAILED_BEFORE, "stop")])
def test_a_verdict_decides_for_the_other_nodes(state, verdict):
    leases, clock = MemoryLeases(), FakeClock()
    verdicts = Verdicts(leases, "node-a", clock.sleep, clock)
    assert verdicts.ask("img-b", "v3.10.0", ttl=600) == "canary"
    verdicts.finish("img-b", "v3.10.0", state)
    assert leases.record()["state"] == state
    assert Verdicts(leases, "node-b", clock.sleep, clock).ask("img-b", "v3.10.0", ttl=600) == verdict


def test_another_node_s_rolling_canary_is_waited_for_and_read_without_a_claim():
    leases, clock = MemoryLeases(), FakeClock()
    assert Verdicts(leases, "node-a", clock.sleep, clock).ask("img-b", "v3.10.0", 600) == "canary"
    node_b = Verdicts(leases, "node-b", clock.sleep, clock)
    assert node_b.ask("img-b", "v3.10.0", 600) == "wait" and node_b.waiting_for == "node-a"
    assert node_b.ask("img-c", "v3.11.0", 600, claim=False) == "free"
    assert leases.record()["canary"] == "node-a"  # a peek writes nothing


def test_a_verdict_is_only_written_over_this_node_s_own_claim():
    leases, clock = MemoryLeases(), FakeClock()
    Verdicts(leases, "node-b", clock.sleep, clock).ask("img-b", "v3.10.0", ttl=600)
    Verdicts(leases, "node-a", clock.sleep, clock).finish("img-b", "v3.10.0", HEALTHY)
    assert leases.record()["state"] == "rolling" and leases.record()["canary"] == "node-b"
