"""The roll of one node (rollout.Roll.apply), branch by branch, with fakes at the edges: what
runs in the container afterwards, what the stack folder points at, what the lease store holds,
and what the log says."""
from __future__ import annotations

import json
import types
from dataclasses import dataclass, field
from typing import List, Optional

import pytest
import tenacity

from quay_bootstrap.budget import LeaseBody
from quay_bootstrap.container import IMAGE_DIGEST, STACK_VERSION
from quay_bootstrap.errors import ContainerError, Interrupted
from quay_bootstrap.pipeline import Live
from quay_bootstrap.rollout import Roll, Rolled
from tests.fakes import (
    V1,
    V2,
    V3,
    FakeClock,
    FakeDocker,
    FakePass,
    FakeStackStore,
    MemoryLeases,
    Release,
    captured_logs,
    events,
    make_config,
)

TTL = 600.0  # rollout.lease_ttl's default
# A new image on the same stack: a failure can only be the image's (roll_states.blame).
V3_IMAGE = Release(V1.version, V3.digest, V3.image_id, V3.tag)
POLL = 2.0


@dataclass
class Node:
    """One node running V1, healthy, with its Roll and a lease store it shares with others."""

    me: str = "node-a"
    clock: FakeClock = field(default_factory=FakeClock)
    leases: MemoryLeases = field(default_factory=MemoryLeases)
    docker: FakeDocker = field(default_factory=FakeDocker)
    store: FakeStackStore = field(default_factory=FakeStackStore)
    passes: List[FakePass] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cfg = make_config()
        first = FakePass(self.cfg, self.docker, self.store, V1)
        first.run()
        self.live: Live = first.live()
        self.docker.calls.clear()
        self.docker.events.clear()
        self.roll = Roll(lambda stack: self.leases, self.me, self.clock.sleep, clock=self.clock,
                         poll=POLL)

    def apply(self, release: Release, verdicts=(), why: str = "refresh") -> Rolled:
        one = FakePass(self.cfg, self.docker, self.store, release, verdicts)
        self.passes.append(one)
        rolled = self.roll.apply(one, self.live, why)
        if rolled.live is not None:
            self.live = rolled.live
        return rolled

    def quay(self) -> Optional[tuple]:
        """(stack version, image digest, status) of the container named quay."""
        found = self.docker.named("quay")
        if found is None:
            return None
        return found.labels[STACK_VERSION], found.labels[IMAGE_DIGEST], found.status


def upgrade_record(release: Release, canary: str, state: str, since: float) -> dict:
    return {"image": release.digest, "canary": canary, "state": state, "since": since}


# --- nothing to roll ------------------------------------------------------------------------

def test_unchanged_adopts_the_running_container_and_returns_the_config():
    node = Node()
    with captured_logs() as logs:
        rolled = node.apply(V1)
    assert rolled.result == "unchanged" and rolled.cfg is node.cfg and rolled.live is None
    assert node.docker.mutations() == []
    assert node.leases.objects == {}  # no lease, no canary record
    assert events(logs, "rollout.unchanged")


@pytest.mark.parametrize("container,release,action", [
    ("missing", V2, "create"),  # someone removed Quay: the watchdog recreates it
    ("stopped", V1, "start"),   # stopped: the watchdog starts it
])
def test_a_missing_or_stopped_container_is_left_to_the_watchdog(container, release, action):
    node = Node()
    found = node.docker.named("quay")
    if container == "missing":
        del node.docker.containers[found.id]
    else:
        found.status = "exited"
    with captured_logs() as logs:
        rolled = node.apply(release)
    assert rolled == Rolled("skipped")
    assert node.docker.mutations() == []
    assert node.leases.objects == {}
    assert [e["action"] for e in events(logs, "rollout.skipped")] == [action]


# --- applied --------------------------------------------------------------------------------

def test_a_new_image_is_applied_under_a_lease_and_the_canary_record_says_healthy():
    node = Node()
    seen = {}

    def healthy(container_id):
        # While Quay comes up on the new image, this node holds a lease and is the canary.
        seen["lease"], seen["record"] = node.leases.lease(0), node.leases.record()
        return True

    with captured_logs() as logs:
        rolled = node.apply(V3, verdicts=[healthy], why="refresh")

    assert rolled.result == "applied"
    assert node.quay() == (V3.version, V3.digest, "running")
    assert len(node.docker.containers) == 1  # the old one was removed once the new one ran
    assert rolled.live.stack_version == V3.version
    assert rolled.live.container_id == node.docker.named("quay").id
    assert node.store.links == {"current": V3.version, "last-known-good": V3.version,
                                "in-use": V3.version}
    assert seen["lease"].holder == "node-a/roll"
    assert seen["record"]["canary"] == "node-a" and seen["record"]["state"] == "rolling"
    assert node.leases.leases() == {}  # released
    record = node.leases.record()
    assert (record["image"], record["canary"], record["state"]) == (V3.digest, "node-a", "healthy")
    assert rolled.change == {"why": "refresh", "result": "applied", "version": V3.version,
                             "image": V3.digest}
    assert events(logs, "rollout.canary")[0]["node"] == "node-a"
    assert events(logs, "rollout.lease_acquired") and events(logs, "rollout.lease_released")
    assert node.clock.slept == []


def test_a_new_stack_on_the_same_image_needs_no_canary():
    node = Node()
    rolled = node.apply(V2)
    assert rolled.result == "applied"
    assert node.quay() == (V2.version, V2.digest, "running")
    assert node.leases.leases() == {} and "upgrade" not in node.leases.objects  # no record


# --- rolled back ----------------------------------------------------------------------------

def test_not_healthy_rolls_back_to_the_old_stack_and_image_and_rejects_the_change():
    node = Node()
    old_id = node.live.container_id
    with captured_logs() as logs:
        rolled = node.apply(V3_IMAGE, verdicts=[_ended_in_validation(node), True])

    assert rolled.result == "rolled back"
    # The old spec runs again, in a new container (the failed one was replaced).
    assert node.quay() == (V1.version, V1.digest, "running")
    assert len(node.docker.containers) == 1 and node.docker.named("quay").id != old_id
    assert rolled.live.container_id == node.docker.named("quay").id
    assert rolled.live.stack_version == V1.version and rolled.cfg is node.cfg
    assert node.store.links == {"current": V1.version, "last-known-good": V1.version,
                                "in-use": V1.version}
    assert node.leases.leases() == {}
    assert node.leases.record()["state"] == "failed-before-migrating"
    assert rolled.change["result"] == "rolled back"
    assert rolled.change["rejected_version"] == V3_IMAGE.version
    assert "web_gunicorn" in rolled.change["error"]
    assert events(logs, "rollout.rolling_back")[0]["log_level"] == "error"
    # Logged by the daemon once the board shows it (see test_daemon).
    assert rolled.event[1] == "rollout.rolled_back" and rolled.event[2]["healthy"] is True

    # The same change again (the next refresh fetches it again): not tried, Quay untouched.
    node.docker.calls.clear()
    with captured_logs() as logs:
        again = node.apply(V3_IMAGE)
    assert again == Rolled("rejected", cfg=node.cfg)
    assert node.docker.mutations() == []
    assert node.quay() == (V1.version, V1.digest, "running")
    assert node.store.current() == V1.version
    assert node.leases.leases() == {}
    assert events(logs, "rollout.still_rejected")


def test_a_rejected_change_does_not_block_the_next_one():
    node = Node()
    assert node.apply(V2, verdicts=[False, True]).result == "rolled back"
    fixed = Release("stack-v2-fixed", V1.digest, V1.image_id)
    assert node.apply(fixed).result == "applied"
    assert node.quay() == (fixed.version, V1.digest, "running")


# --- the budget -----------------------------------------------------------------------------

def test_a_lease_another_live_node_holds_makes_the_roll_wait_until_it_expires():
    node = Node()
    expires = node.clock() + 30
    node.leases.put("lease-0", LeaseBody("node-b", expires, "refresh").encode())
    replaced_at = []

    with captured_logs() as logs:
        rolled = node.apply(V2, verdicts=[lambda cid: replaced_at.append(node.clock()) or True])

    assert rolled.result == "applied"
    assert set(node.clock.slept) == {POLL}
    assert replaced_at[0] >= expires  # Quay was not touched while node-b held the slot
    assert replaced_at[0] < expires + 2 * POLL
    assert len(events(logs, "rollout.waiting_for_lease")) == 1  # not once per poll
    taken = events(logs, "rollout.lease_taken_over")
    assert taken and taken[0]["from_holder"] == "node-b"
    assert node.leases.leases() == {}


def test_a_lease_released_by_its_holder_is_taken_without_a_takeover():
    node = Node()
    node.leases.put("lease-0", LeaseBody("node-b", node.clock() + TTL).encode())

    def node_b_finishes(clock):
        if len(clock.slept) == 3:
            node.leases.delete("lease-0")

    node.clock.on_sleep = node_b_finishes
    with captured_logs() as logs:
        rolled = node.apply(V2)
    assert rolled.result == "applied"
    assert node.clock.slept == [POLL] * 3
    assert not events(logs, "rollout.lease_taken_over")


def test_the_lease_store_failing_once_during_acquire_is_retried():
    node = Node()
    node.leases.fail("create", ConnectionError("the store blinked"))
    with captured_logs() as logs:
        rolled = node.apply(V2)
    assert rolled.result == "applied"
    assert node.quay() == (V2.version, V2.digest, "running")
    failed = events(logs, "rollout.lease_store_failed")
    assert [(e["log_level"], e["error"]) for e in failed] == [("warning", "the store blinked")]
    assert node.clock.slept == [POLL]
    assert node.leases.leases() == {}


def test_the_lease_store_failing_on_release_logs_an_error_and_leaves_the_lease_to_expire(
        monkeypatch):
    # Budget.release retries with tenacity's default sleep (time.sleep, not the roll's sleep):
    # its documented test hook is tenacity.nap, so the retries wait on nothing here.
    naps: List[float] = []
    monkeypatch.setattr(tenacity.nap, "time", types.SimpleNamespace(sleep=naps.append))
    node = Node()
    node.leases.fail("replace", OSError("the store is down"), times=3)
    with captured_logs() as logs:
        rolled = node.apply(V2)
    assert rolled.result == "applied"  # no exception: the change is in place
    failed = events(logs, "rollout.lease_release_failed")
    assert [(e["log_level"], e["slot"]) for e in failed] == [("error", 0)]
    assert not events(logs, "rollout.lease_released")
    lease = node.leases.lease(0)
    assert lease.holder == "node-a/roll" and lease.expires == node.clock() + TTL
    assert len(naps) == 2


# --- the canary -----------------------------------------------------------------------------

def test_a_second_node_waits_while_the_canary_rolls_and_goes_when_it_is_healthy():
    node = Node(me="node-b")
    since = node.clock()
    node.leases.put("upgrade", upgrade_record(V3, "node-a", "rolling", since))

    def canary_verdict(clock):
        if len(clock.slept) == 4:  # node-a's Quay answered healthy
            node.leases.put("upgrade", upgrade_record(V3, "node-a", "healthy", clock()))

    node.clock.on_sleep = canary_verdict
    with captured_logs() as logs:
        rolled = node.apply(V3)

    assert rolled.result == "applied"
    assert node.clock.slept == [POLL] * 4
    assert node.quay() == (V3.version, V3.digest, "running")
    record = node.leases.record()
    assert (record["canary"], record["state"]) == ("node-a", "healthy")  # node-b did not claim
    assert [e["canary"] for e in events(logs, "rollout.waiting_for_canary")] == ["node-a"]
    assert not events(logs, "rollout.canary")


def test_a_failed_canary_stops_the_roll_and_nothing_is_replaced():
    node = Node(me="node-b")
    node.leases.put("upgrade", upgrade_record(V3, "node-a", "failed", node.clock()))
    with captured_logs() as logs:
        rolled = node.apply(V3)
    assert rolled == Rolled("stopped", cfg=node.cfg)
    assert node.docker.mutations() == []
    assert node.quay() == (V1.version, V1.digest, "running")
    assert node.store.current() == V1.version
    assert node.leases.leases() == {}  # no lease was taken
    stopped = events(logs, "rollout.stopped")
    assert stopped[0]["log_level"] == "error" and stopped[0]["canary"] == "node-a"
    # Not asked again until the lock changes.
    assert node.apply(V3) == Rolled("rejected", cfg=node.cfg)


def test_a_stale_rolling_record_is_taken_over():
    node = Node(me="node-b")
    node.leases.put("upgrade", upgrade_record(V3, "node-gone", "rolling", node.clock() - TTL - 1))
    with captured_logs() as logs:
        rolled = node.apply(V3)
    assert rolled.result == "applied"
    assert node.clock.slept == []
    record = node.leases.record()
    assert (record["canary"], record["state"]) == ("node-b", "healthy")
    assert events(logs, "rollout.canary")[0]["node"] == "node-b"


def test_a_rolling_record_younger_than_the_lease_ttl_is_waited_for():
    node = Node(me="node-b")
    node.leases.put("upgrade", upgrade_record(V3, "node-a", "rolling", node.clock() - TTL + 10))

    def sigterm(clock):
        raise Interrupted()

    node.clock.on_sleep = sigterm
    with pytest.raises(Interrupted):
        node.apply(V3)
    assert node.leases.record()["canary"] == "node-a"


def test_the_canary_that_restarted_mid_upgrade_carries_on():
    node = Node(me="node-a")
    node.leases.put("upgrade", upgrade_record(V3, "node-a", "rolling", node.clock() - 5))
    rolled = node.apply(V3)
    assert rolled.result == "applied" and node.clock.slept == []
    assert node.leases.record()["state"] == "healthy"


def test_a_record_for_an_older_image_does_not_hold_back_a_new_one():
    node = Node(me="node-b")
    node.leases.put("upgrade", upgrade_record(V1, "node-a", "failed", node.clock()))
    assert node.apply(V3).result == "applied"
    record = node.leases.record()
    assert (record["image"], record["canary"]) == (V3.digest, "node-b")


# --- SIGTERM --------------------------------------------------------------------------------

def _sigterm(clock):
    raise Interrupted()


@pytest.mark.parametrize("waiting_for", ["lease", "canary"])
def test_sigterm_while_waiting_propagates_and_releases_nothing_it_did_not_take(waiting_for):
    node = Node(me="node-b")
    if waiting_for == "lease":
        node.leases.put("lease-0", LeaseBody("node-a/roll", node.clock() + TTL, "refresh").encode())
        release = V2
    else:
        node.leases.put("upgrade", upgrade_record(V3, "node-a", "rolling", node.clock()))
        release = V3
    before = dict(node.leases.objects)
    node.clock.on_sleep = _sigterm

    with captured_logs() as logs:
        with pytest.raises(Interrupted):
            node.apply(release)

    assert node.leases.objects == before  # node-a's lease and record, exactly as they were
    assert node.docker.mutations() == []
    assert node.quay() == (V1.version, V1.digest, "running")
    assert not events(logs, "rollout.lease_released")
    assert len(node.clock.slept) == 1


# --- a canary that migrated, and the database ahead of a node -----------------------------

def _migrated_then_failed(node):
    def verdict(container_id):
        node.docker.containers[container_id].logs = (
            "Running init script '/quay-registry/conf/init/runmigration.sh'\n")
        return False
    return verdict


def _ended_in_validation(node):
    """Quay's start ended in config-tool's validation (exit 1): it never reached its migration."""
    def verdict(container_id):
        found = node.docker.containers[container_id]
        found.logs = ("Running init script '/quay-registry/conf/init/d_validate_config_bundle.sh'\n"
                      "Validating Configuration\n")
        found.status = "exited"
        return False
    return verdict


def test_a_canary_that_failed_after_migrating_is_held_not_rolled_back():
    import json

    node = Node()
    rolled = node.apply(V3, verdicts=[_migrated_then_failed(node)])
    assert rolled.result == "held"
    # Kept for `docker logs`; the old image would fail against the migrated database.
    assert node.quay() == (V3.version, V3.digest, "running")
    assert len(node.docker.containers) == 1
    assert node.leases.record()["state"] == "failed-after-migrating"
    assert json.loads(node.leases.objects["database"][0])["image"] == V3.digest
    held = node.leases.leases()  # out of service: its slot stays taken, the budget counts it
    assert [lease.holder for lease in held.values()] == ["node-a/roll"] and rolled.lease
    assert "held out of service" in rolled.change["reason"]
    # The rollout stops on every node.
    other = Node(me="node-b", leases=node.leases)
    assert other.apply(V3).result == "stopped"
    assert other.quay() == (V1.version, V1.digest, "running")


def test_a_canary_that_failed_with_no_sign_of_where_is_held_as_if_it_migrated():
    node = Node()
    rolled = node.apply(V3, verdicts=[False])  # still running, nothing in its logs
    assert rolled.result == "held"
    assert node.leases.record()["state"] == "failed-after-migrating"
    assert node.quay() == (V3.version, V3.digest, "running")


def test_a_canary_that_failed_before_migrating_goes_back_to_the_old_image():
    node = Node()
    rolled = node.apply(V3_IMAGE, verdicts=[_ended_in_validation(node), True])
    assert rolled.result == "rolled back"
    assert node.quay() == (V1.version, V1.digest, "running")
    assert node.leases.record()["state"] == "failed-before-migrating"
    # Recorded before the start (the agent might have died after it): older starts nomigrate.
    assert node.docker.named("quay").spec.command == ("registry-nomigrate",)


def test_a_restart_after_another_node_migrated_the_database_uses_registry_nomigrate():
    node = Node()
    assert node.roll.restart_spec(node.live) == node.live.spec  # nothing recorded yet
    node.leases.put("database", {"image": V3.digest, "tag": V3.tag, "at": 0})
    spec = node.roll.restart_spec(node.live)
    assert spec.command == ("registry-nomigrate",)
    assert spec.labels[IMAGE_DIGEST] == V1.digest  # the same image, started without migrating


def test_run_once_starts_an_image_older_than_the_database_without_migrating():
    """Seen on real Quay: v3.17.4's `registry` on a database v3.18.0 migrated exits 255."""
    node = Node()
    node.leases.put("database", {"image": V3.digest, "tag": V3.tag, "at": 0})
    one = FakePass(node.cfg, node.docker, node.store, V2)
    outcome = node.roll.once(one)
    assert outcome.healthy
    assert node.quay() == (V2.version, V2.digest, "running")
    assert node.docker.named("quay").spec.command == ("registry-nomigrate",)
    assert json.loads(node.leases.objects["database"][0])["image"] == V3.digest  # never back


def test_a_canary_docker_restarted_after_its_migration_failed_is_held():
    """Real Quay: alembic fails (exit 255), Docker's restart policy starts it again, and its
    logs are read while the second run is in its first init scripts."""
    node = Node()

    def verdict(container_id):
        found = node.docker.containers[container_id]
        found.logs = ("Running init script '/quay-registry/conf/init/runmigration.sh'\n"
                      "FAILED: Can't locate revision identified by 'x'\n"
                      "Running init script '/quay-registry/conf/init/certs_install.sh'\n")
        return False

    rolled = node.apply(V3, verdicts=[verdict])
    assert rolled.result == "held"
    assert node.leases.record()["state"] == "failed-after-migrating"
    assert node.docker.named("quay").restart_policy == "no"  # read once Docker would not restart it


def test_a_canary_docker_started_again_gets_time_to_end_its_run_before_the_verdict():
    node = Node()
    began = node.clock()

    def verdict(container_id):
        found = node.docker.containers[container_id]
        found.logs = "Running init script '/quay-registry/conf/init/d_validate_config_bundle.sh'\n"
        found.restarts = 1  # exited, and Docker started it again: this run has not ended
        return False

    rolled = node.apply(V3, verdicts=[verdict])
    assert node.clock() - began >= 30  # VERDICT_WAIT: it might have reached its migration
    assert rolled.result == "held"  # still running after it: in doubt, migrated


def test_run_once_moves_the_database_record_before_a_migrating_start():
    node = Node()
    one = FakePass(node.cfg, node.docker, node.store, V3)
    create = node.docker.create_and_start
    seen = []

    def recorded_first(spec):
        seen.append(json.loads(node.leases.objects["database"][0])["image"])
        return create(spec)

    node.docker.create_and_start = recorded_first
    assert node.roll.once(one).healthy
    assert seen == [V3.digest]  # moved before Quay started
    assert not node.docker.named("quay").spec.command  # Quay's own: registry
    assert json.loads(node.leases.objects["database"][0])["image"] == V3.digest
    # Nothing to start: the record is left as it is.
    node.leases.objects.pop("database")
    assert node.roll.once(FakePass(node.cfg, node.docker, node.store, V3)).healthy
    assert "database" not in node.leases.objects


def test_run_once_goes_through_the_canary_gate():
    node = Node()
    # A version the cluster has not seen: this node is its canary, and the verdict is recorded.
    assert node.roll.once(FakePass(node.cfg, node.docker, node.store, V3)).healthy
    assert node.leases.record()["state"] == "healthy"
    assert node.leases.record()["canary"] == node.me
    # A version whose canary failed is never started.
    other = Node(me="node-b")
    other.leases.put("upgrade", upgrade_record(V3, "node-z", "failed-after-migrating",
                                               other.clock()))
    with pytest.raises(ContainerError, match="canary failed"):
        other.roll.once(FakePass(other.cfg, other.docker, other.store, V3))
    assert other.quay() == (V1.version, V1.digest, "running")


def test_run_once_on_a_store_that_refuses_the_records_is_a_plain_pass():
    """A store without writes for this role (a 501, a 403): run --once still puts Quay in place,
    as before the records existed, and says so."""
    node = Node()
    node.leases.fail("create", OSError("501 Not Implemented"), times=5)
    with captured_logs() as logs:
        outcome = node.roll.once(FakePass(node.cfg, node.docker, node.store, V3))
    assert outcome.healthy and node.quay() == (V3.version, V3.digest, "running")
    assert len(events(logs, "rollout.records_unavailable")) == 1


def test_run_once_keeps_a_quay_that_differs_only_by_the_entry_point():
    node = Node()
    node.leases.put("database", {"image": V3.digest, "tag": V3.tag, "at": 0})
    before = node.docker.named("quay").id
    assert node.roll.once(FakePass(node.cfg, node.docker, node.store, V1)).healthy
    assert node.docker.named("quay").id == before  # serving; rolled forward later


def test_a_rollback_onto_a_database_a_newer_image_migrated_starts_without_migrating():
    node = Node()
    node.leases.put("upgrade", upgrade_record(V3, "node-z", "healthy", node.clock()))
    node.leases.put("database", {"image": V3.digest, "tag": V3.tag, "at": 0})
    rolled = node.apply(V3, verdicts=[False, True])  # not the canary: fails here alone
    assert rolled.result == "rolled back"
    assert node.docker.named("quay").spec.command == ("registry-nomigrate",)


# --- the first start of a node (a new cluster, a scale-out) ----------------------------------

def _bare(me, leases, clock=None):
    """A node with no Quay yet, sharing `leases` with the others."""
    node = Node(me=me, leases=leases, clock=clock or FakeClock())
    node.docker.containers.clear()
    return node


def test_the_first_node_of_a_new_cluster_is_the_canary_the_others_wait_for_its_verdict():
    leases = MemoryLeases()
    first = _bare("node-a", leases)
    one = FakePass(first.cfg, first.docker, first.store, V3)
    live, deferred, rolled = first.roll.first(one)
    assert not deferred and rolled.result == "started"
    assert leases.record()["state"] == "rolling" and leases.record()["canary"] == "node-a"
    assert first.quay() == (V3.version, V3.digest, "running")
    verdicts, image, tag = rolled.canary  # the watch judges it (see test_daemon)
    verdicts.finish(image, tag, "healthy")

    second = _bare("node-b", leases)
    leases.put("upgrade", upgrade_record(V3, "node-a", "rolling", second.clock()))
    leases.objects.pop("database", None)

    def verdict_arrives(clock):
        leases.put("upgrade", upgrade_record(V3, "node-a", "healthy", clock()))
        leases.put("database", {"image": V3.digest, "tag": V3.tag, "at": clock()})
    second.clock.on_sleep = verdict_arrives
    one = FakePass(second.cfg, second.docker, second.store, V3)
    _, _, rolled = second.roll.first(one)
    assert second.clock.slept == [POLL]  # it waited for the canary before starting
    assert second.quay() == (V3.version, V3.digest, "running")


def test_a_node_booting_after_a_failed_canary_does_not_start_that_image():
    from quay_bootstrap.errors import ContainerError

    leases = MemoryLeases()
    leases.put("upgrade", upgrade_record(V3, "node-a", "failed-after-migrating", 0))
    node = _bare("node-d", leases)
    with pytest.raises(ContainerError, match="canary failed"):
        node.roll.first(FakePass(node.cfg, node.docker, node.store, V3))
    assert node.docker.named("quay") is None
