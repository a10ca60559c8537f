"""Leaving the load balancer before a planned stop (drain.py): the period, the /ready answer and
what is left to wait, from tables; then the daemon with fakes: a roll and a restart of a
running Quay drain first, a crash does not, and a roll back to a Quay that is not healthy keeps
the node's slot of the budget."""
from __future__ import annotations

import threading

import pytest

from quay_bootstrap import drain
from quay_bootstrap.container import STACK_VERSION
from quay_bootstrap.drain import Drain
from quay_bootstrap.status import Board
from tests.fakes import V1, V2, make_config
from tests.unit.test_daemon import WEB_DOWN, Node

MUTATIONS = {"create_and_start", "start", "stop", "rename", "remove", "restart_quay", "stop_quay"}
BALANCER = "balancer: {check_interval: 2s, fall: 3, in_flight: 4s}\n"


@pytest.mark.parametrize("extra, period", [
    ("", 0.0),  # no balancer stated: nothing checks /ready, nothing to wait for
    (BALANCER, 2 * (3 + 1) + 4),
    (BALANCER + "rollout: {drain_period: 20s}", 20.0),  # stated outright
    (BALANCER + "rollout: {drain: false}", 0.0),  # off: stopped at once
    ("rollout: {drain_period: 7s}", 7.0),
], ids=["none", "derived", "stated", "off", "stated-without-balancer"])
def test_the_drain_period(extra, period):
    assert drain.drain_period(make_config(extra)) == period


def test_the_default_balancer_drains_for_55s_within_the_default_lease():
    cfg = make_config("balancer: {}")
    assert drain.drain_period(cfg) == 10 * (3 + 1) + 15
    assert cfg.rollout.lease_ttl > 55 + cfg.container.stop_timeout + cfg.health.start_period


def test_a_lease_shorter_than_drain_stop_and_start_is_refused():
    with pytest.raises(Exception, match="rollout.drain_period \\+ container.stop_timeout"):
        make_config("rollout: {drain_period: 60s, lease_ttl: 100s}\n"
                    "container: {stop_timeout: 10s}\nhealth: {start_period: 30s}")


@pytest.mark.parametrize("status, answer", [
    ({"state": "healthy"}, (200, "ready")),
    ({"state": "healthy", "draining": {"why": "roll"}}, (503, "draining")),
    ({"state": "healthy", "marked_unhealthy": True}, (503, "unhealthy")),
    ({"state": "starting"}, (503, "starting")),
    ({"state": "failing"}, (503, "failing")),
    ({"state": "shared-outage"}, (503, "shared-outage")),  # as Quay's own check would answer
    ({"state": "held", "marked_unhealthy": True}, (503, "unhealthy")),
    ({"state": "terminating"}, (503, "terminating")),
    ({}, (503, "starting")),
    ({"state": "starting", "ready_carried_until": 110.0}, (200, "ready")),  # agent restarted
    ({"state": "starting", "ready_carried_until": 90.0}, (503, "starting")),  # carried too long
    ({"state": "failing", "ready_carried_until": 110.0}, (503, "failing")),  # its own probe said
], ids=lambda v: str(v))
def test_what_ready_answers(status, answer):
    assert drain.ready(status, 100.0) == answer


@pytest.mark.parametrize("since, left", [
    (None, 30.0),  # ready until now: the whole period
    (100.0, 30.0),
    (90.0, 20.0),  # failing for 10 s already: the balancer took it out that long ago
    (50.0, 0.0),
    (130.0, 30.0),  # a clock step back counts as no time out
])
def test_what_is_left_to_wait(since, left):
    assert drain.remaining(30.0, 100.0, since) == left


@pytest.mark.parametrize("previous, until", [
    ({"state": "healthy", "last_probe": {"ok": True, "at": 95.0}}, 125.0),
    ({"state": "healthy", "last_probe": {"ok": True, "at": 60.0}}, None),  # too old
    ({"state": "healthy", "last_probe": {"ok": True, "at": 130.0}}, None),  # from the future
    ({"state": "healthy", "last_probe": {"ok": True}}, None),  # an older agent's file
    ({"state": "failing", "last_probe": {"ok": False, "at": 99.0}}, None),
    ({"state": "healthy", "draining": {"why": "roll"}, "last_probe": {"ok": True, "at": 99.0}},
     None),
    ({"state": "healthy", "marked_unhealthy": True, "last_probe": {"ok": True, "at": 99.0}},
     None),
    ({}, None),
])
def test_what_a_restarted_agent_carries_over(previous, until):
    assert drain.carried(previous, 100.0, 25.0) == until


class FakeStandby:
    """aws.Standby's surface: `acts` is the node's list (the order against Docker's acts)."""

    def __init__(self, acts: list, works: bool = True) -> None:
        self.acts, self.works, self.sleep = acts, works, None

    def enter(self, reason: str, timeout: float = 120.0) -> bool:
        self.acts.append(("enter standby", reason))
        return self.works

    def exit(self, timeout: float = 120.0) -> bool:
        self.acts.append(("exit standby",))
        return True


def drained_node(extra: str = BALANCER, standby: bool = True) -> Node:
    """A node behind a balancer whose drain sleeps on the fake clock and records each act on
    Docker and each drain wait in one list, in order."""
    node = Node(extra=extra)
    node.acts = acts = []
    sleep = node.clock.sleep

    def recorded_sleep(seconds: float) -> None:
        acts.append(("drain", seconds, node.board.snapshot().get("draining", {}).get("why")))
        sleep(seconds)

    node.standby = FakeStandby(acts, works=standby)
    node.daemon.node.balancer = Drain(node.board, recorded_sleep, clock=node.clock,
                                      standby=lambda cfg, sleep: node.standby)
    original = node.docker._call

    def call(method: str, *args) -> None:
        if method in MUTATIONS:
            acts.append(("docker", method))
        original(method, *args)

    node.docker._call = call
    node.shared = None  # Quay's /health/endtoend answer for the next passes (None: healthy)
    made = node.daemon.make_pass

    def make_pass(cfg, sleep):
        one = made(cfg, sleep)
        one.shared = node.shared or one.shared
        return one

    node.daemon.make_pass = make_pass
    return node


def test_a_roll_leaves_the_balancer_before_it_stops_quay_and_ready_waits_for_health():
    node = drained_node().start().after(20)
    node.probe()
    assert drain.ready(node.status(), node.clock())[0] == 200
    node.acts.clear()
    node.release = V2
    node.roll("refresh")
    first_stop = next(i for i, act in enumerate(node.acts) if act[0] == "docker")
    assert node.acts[:first_stop] == [("drain", 12.0, "refresh: roll")]
    assert node.docker.named("quay").labels[STACK_VERSION] == V2.version
    assert "draining" not in node.status() or node.status()["draining"] is None
    assert drain.ready(node.status(), node.clock()) == (503, "starting")  # not yet probed
    node.probe()
    assert drain.ready(node.status(), node.clock()) == (200, "ready")


def test_a_roll_with_nothing_to_change_does_not_drain():
    node = drained_node().start().after(20)
    node.probe()
    node.acts.clear()
    node.roll("refresh")
    assert node.acts == [] and drain.ready(node.status(), node.clock()) == (200, "ready")


def test_with_drain_off_a_roll_stops_quay_at_once():
    node = drained_node(BALANCER + "rollout: {drain: false}").start().after(20)
    node.probe()
    node.acts.clear()
    node.release = V2
    node.roll("refresh")
    assert [act for act in node.acts if act[0] == "drain" and act[1] > 0] == []
    assert node.docker.named("quay").labels[STACK_VERSION] == V2.version


def test_the_agent_restarting_a_running_quay_that_said_ready_drains_the_whole_period():
    node = drained_node().start().after(20)
    node.probe()
    node.acts.clear()
    node.probe(WEB_DOWN)
    node.probe(WEB_DOWN)  # failure_threshold 2: restarted at once, /ready said 200 till now
    assert node.restarts() == 1
    assert node.acts == [("drain", 12.0, "restart: 2 failed probes: HTTP 503"),
                         ("docker", "restart_quay")]


def test_a_restart_that_waited_for_the_budget_drains_only_what_is_left_of_the_period():
    from quay_bootstrap.budget import LeaseBody

    node = drained_node().start().after(20)
    node.probe()
    node.leases.put("lease-0", LeaseBody("node-b", node.clock() + 5, "rolling").encode())
    node.acts.clear()
    node.probe(WEB_DOWN)
    node.probe(WEB_DOWN)  # failing: the restart waits for node-b's slot; /ready 503 from here
    out_since = node.clock()
    assert node.restarts() == 0 and drain.ready(node.status(), node.clock()) == (503, "failing")
    node.after(10).tick()  # node-b's lease ran out, the deferred restart is due: now
    assert node.restarts() == 1
    assert node.clock() - 2.0 == out_since + 10  # 10 s of the 12 s passed out already
    assert node.acts == [("drain", 2.0,
                          "restart: 2 failed probes: HTTP 503"), ("docker", "restart_quay")]



def test_a_crashed_quay_is_restarted_at_once_without_a_drain():
    node = drained_node().start().after(20)
    node.probe()
    node.acts.clear()
    node.docker.crash("quay", 137)
    node.pump()
    assert node.restarts() == 1
    assert [act for act in node.acts if act[0] == "drain"] == []


def join_standby_exit() -> None:
    for thread in threading.enumerate():
        if thread.name == "standby-exit":
            thread.join(timeout=2)


@pytest.mark.parametrize("entered", [True, False], ids=["entered", "timed-out"])
def test_standby_is_entered_before_the_stop_and_left_once_quay_is_healthy(entered):
    """Left even when entering timed out: EnterStandby may have been sent (exit() undoes only
    what was done)."""
    node = drained_node(BALANCER + "rollout: {standby: true}", standby=entered)
    node.start().after(20).probe()
    node.acts.clear()
    node.release = V2
    node.roll("refresh")
    assert node.acts[:3] == [("enter standby", "refresh: roll"),
                             ("drain", 12.0, "refresh: roll"), ("docker", "stop")]
    assert ("exit standby",) not in node.acts  # not on the roll's own health check
    node.probe()  # healthy on the new stack, by the watch: back InService, off the loop
    join_standby_exit()
    assert node.acts[-1] == ("exit standby",)


def test_a_node_rolled_back_to_a_quay_that_is_not_healthy_keeps_its_slot_until_it_is():
    node = drained_node().start().after(20)
    node.probe()
    node.release = V2
    node.verdicts = [False, False]  # the new stack fails, and the old one after it too
    node.roll("refresh")
    assert node.docker.named("quay").labels[STACK_VERSION] == V1.version
    assert node.status()["last_change"]["healthy"] is False
    assert [lease.holder for lease in node.leases.leases().values() if lease] == \
        ["node-a/roll"]  # the next node does not start draining
    assert node.status()["leases"]
    node.probe()
    assert [lease for lease in node.leases.leases().values() if lease] == []
    assert node.status()["leases"] == []


def test_a_new_image_waits_while_endtoend_says_the_database_is_down():
    from quay_bootstrap import health
    from tests.fakes import V3

    node = drained_node().start().after(20)
    node.probe()
    node.release = V3
    node.shared = health.Probe(False, 503, {"database": False, "redis": True}, error="HTTP 503")
    node.acts.clear()
    node.roll("refresh")
    status = node.status()
    assert status["not_applied"]["why"] == "waiting: shared services down"
    assert status["endtoend"]["services"] == {"database": False, "redis": True}
    assert node.board.registry.get_sample_value("quay_bootstrap_endtoend_up") == 0
    assert node.acts == []  # nothing drained, nothing touched
    assert node.docker.named("quay").labels[STACK_VERSION] == V1.version
    node.shared = None  # the database answers again: it rolls
    node.roll("refresh")
    assert node.docker.named("quay").labels[STACK_VERSION] == V3.version
    assert node.board.registry.get_sample_value("quay_bootstrap_endtoend_up") == 1


def test_a_node_that_keeps_its_slot_keeps_it_through_its_next_failed_roll():
    """Found in review: the next roll took a second copy of the slot and gave it back."""
    node = drained_node().start().after(20)
    node.probe()
    node.release = V2
    node.verdicts = [False, False]
    node.roll("refresh")
    node.after(200)  # past the backoff: the same stack is tried again, and fails again
    node.verdicts = [False, False]
    node.roll("refresh")
    assert node.docker.named("quay").labels[STACK_VERSION] == V1.version
    assert [lease.holder for lease in node.leases.leases().values() if lease] == \
        ["node-a/roll"]
    assert len(node.status()["leases"]) == 1
    node.probe()
    assert [lease for lease in node.leases.leases().values() if lease] == []


def test_ready_is_503_after_a_roll_that_touched_quay_until_a_probe_says_healthy():
    node = drained_node().start().after(20)
    node.probe()
    node.release = V2
    node.verdicts = [False, False]
    node.roll("refresh")  # rolled back; the old container runs, not probed by the watch yet
    assert drain.ready(node.status(), node.clock()) == (503, "starting")


def test_an_operator_may_roll_an_image_past_a_failing_endtoend():
    from quay_bootstrap import health
    from tests.fakes import V3

    node = drained_node(BALANCER + "rollout: {wait_for_shared_services: false}").start()
    node.after(20).probe()
    node.release = V3
    node.shared = health.Probe(False, 503, {"storage": False}, error="HTTP 503")
    node.roll("refresh")
    assert node.docker.named("quay").labels[STACK_VERSION] == V3.version
    assert "endtoend" not in node.status()  # not even read


def test_a_stack_change_rolls_while_endtoend_says_the_database_is_down():
    """It may be the fix (a DB_URI that moved): its own Quay's health decides."""
    from quay_bootstrap import health

    node = drained_node().start().after(20)
    node.release = V2
    node.shared = health.Probe(False, 503, {"database": False}, error="HTTP 503")
    node.roll("refresh")
    assert node.docker.named("quay").labels[STACK_VERSION] == V2.version


def test_board_draining_shows_in_status():
    board = Board()
    board.update(state="healthy")
    left = []
    d = Drain(board, left.append, clock=lambda: 1000.0)
    d.leave(make_config(BALANCER), "refresh: roll")
    assert board.snapshot()["draining"] == {"why": "refresh: roll", "since": 1000.0,
                                            "until": 1012.0}
    assert left == [12.0]
    d.back()
    assert board.snapshot()["draining"] is None
