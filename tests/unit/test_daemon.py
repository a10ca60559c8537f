"""The daemon loop's decisions (daemon.Daemon) with fakes at the edges and a fake clock: what it
does to the container, what the status board says, whom it tells. Observations are fed to the
loop as its threads would put them on its queue (`Daemon.feed`); no thread is started, except by
the tests of the loop's threads (kept running), with stand-ins for their work."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from quay_bootstrap import watchdog
from quay_bootstrap.budget import LeaseBody
from quay_bootstrap.container import STACK_VERSION
from quay_bootstrap.daemon import Daemon
from quay_bootstrap.errors import Unavailable
from quay_bootstrap.escalation import Escalation
from quay_bootstrap.rollout import Roll
from quay_bootstrap.status import Board
from tests.fakes import (
    V1,
    V2,
    FakeClock,
    FakeDocker,
    FakePass,
    FakeStackStore,
    FakeSystemd,
    FakeTarget,
    MemoryLeases,
    Release,
    captured_logs,
    events,
    make_config,
)

# Quick to reason about: two failed probes fail Quay; escalate after the second restart.
WALL = 1_760_000_000.0  # the fake clock's 0 on the wall clock Docker dates events with
SETTINGS = """
health: {failure_threshold: 2, start_period: 300s}
restart: {backoff_initial: 10s, backoff_max: 20s, unhealthy_after: 3, window: 30m}
"""
WEB_DOWN = (("database", True), ("web_gunicorn", False))
ALL_UP = (("database", True), ("web_gunicorn", True))


@dataclass
class Node:
    """A node whose Quay (V1) the daemon watches. `release` is what the cluster's source says
    now; `prepare_error` makes the next passes fail before touching anything."""

    extra: str = ""
    release: Release = V1
    prepare_error: Optional[BaseException] = None
    verdicts: list = field(default_factory=list)
    clock: FakeClock = field(default_factory=FakeClock)
    docker: FakeDocker = field(default_factory=FakeDocker)
    store: FakeStackStore = field(default_factory=FakeStackStore)
    leases: MemoryLeases = field(default_factory=MemoryLeases)
    systemd: FakeSystemd = field(default_factory=FakeSystemd)
    targets: List[FakeTarget] = field(
        default_factory=lambda: [FakeTarget("autoscaling"), FakeTarget("on_unhealthy")])
    passes: List[FakePass] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cfg = make_config(SETTINGS + self.extra)
        self.board = Board(clock=self.clock)
        self.docker.wall = self.wall  # Docker dates its events on the same (fake) wall clock
        self.daemon = Daemon(
            self.cfg, self.make_pass, threading.Event(), clock=self.clock, wall=self.wall,
            board=self.board,
            systemd=self.systemd,
            escalation=Escalation(lambda: self.targets, self.board.update),
            roll=Roll(lambda stack: self.leases, "node-a", self.clock.sleep, clock=self.clock),
            spawn=lambda roll: roll())  # the roll runs in place; its outcome is queued

    def settle(self) -> None:
        """The loop takes what the roll put on its queue."""
        while True:
            try:
                self.daemon.handle(self.daemon.events.get_nowait())
            except queue.Empty:
                return

    def roll(self, why: str = "refresh") -> None:
        self.daemon._roll(self.daemon.cfg, why)
        self.settle()

    def make_pass(self, cfg, sleep) -> FakePass:
        one = FakePass(cfg, self.docker, self.store, self.release, self.verdicts,
                       prepare_error=self.prepare_error)
        self.passes.append(one)
        return one

    def existing_quay(self, age: float) -> str:
        """Quay already runs V1 (the agent restarted), started `age` seconds ago."""
        FakePass(self.cfg, self.docker, self.store, V1).run(wait_for_health=False)
        found = self.docker.named("quay")
        self.docker.ages[found.id] = age
        self.docker.calls.clear()
        self.docker.events.clear()
        return found.id

    def start(self) -> "Node":
        self.daemon._first_pass()
        self.first_pass_mutations = self.docker.mutations()
        self.docker.calls.clear()  # its own events stay: dated before it was done, echoes
        return self

    def after(self, seconds: float) -> "Node":
        self.clock.advance(seconds)
        return self

    def wall(self) -> float:
        return WALL + self.clock()

    def pump(self) -> None:
        """Docker's events for quay so far, as the docker-events thread delivers them now
        (dated when Docker says they happened), handled when the loop gets to them."""
        self.docker.watch("quay", self.daemon.stop, self.daemon.docker_event)
        self.settle()

    def probe(self, services=ALL_UP, error: str = "") -> None:
        ok = all(good for _, good in services)
        self.daemon.feed(watchdog.Probed(self.clock(), ok, services,
                                         error or ("" if ok else "HTTP 503"), 200 if ok else 503))

    def tick(self) -> None:
        self.daemon.feed(watchdog.Tick(self.clock()))

    def restarts(self) -> int:
        """Restarts the agent carried out through Docker."""
        return sum(1 for name, _ in self.docker.calls if name == "restart_quay")

    def status(self) -> dict:
        return self.board.snapshot()

    def wait_for_escalation(self) -> None:
        for thread in threading.enumerate():
            if thread.name == "escalate":
                thread.join(timeout=1)


# --- the first pass -------------------------------------------------------------------------

def test_the_first_pass_adopts_the_running_quay():
    node = Node()
    quay = node.existing_quay(age=3600)
    node.start()
    assert node.first_pass_mutations == []
    assert node.daemon.live.container_id == quay
    status = node.status()
    assert (status["state"], status["stack_version"], status["container"]) == \
        ("starting", V1.version, "quay")


def test_a_change_that_came_while_the_agent_was_down_goes_through_the_budget():
    """An agent (re)start, e.g. an upgrade across the fleet, finds its running Quay drifted:
    it is adopted untouched, and the change is rolled at once, under a lease."""
    node = Node()
    quay = node.existing_quay(age=3600)
    node.release = V2
    node.leases.put("lease-0", LeaseBody("node-b", node.clock() + 60, "rolling").encode())
    with captured_logs() as logs:
        node.start()
    assert node.first_pass_mutations == []  # Quay runs as it did
    assert node.daemon.live.container_id == quay and node.status()["stack_version"] == V1.version
    assert events(logs, "rollout.deferred")[0]["reason"] == "changed: stack version"
    assert node.daemon.refresh.due_at <= node.clock()  # rolled at the loop's next turn
    node.after(61)  # node-b's lease runs out
    node.daemon.refresh.run_if_due()
    node.settle()
    assert node.docker.named("quay").labels[STACK_VERSION] == V2.version
    assert node.status()["stack_version"] == V2.version


@pytest.mark.parametrize("age,restarted", [
    (3600, True),  # an adopted Quay that ran for an hour gets no fresh start period
    (0, False),    # one that just started: failed probes in its start period do not count
])
def test_an_adopted_quay_keeps_its_age(age, restarted):
    node = Node()
    node.existing_quay(age=age)
    node.start().after(5)
    node.probe(WEB_DOWN)
    node.after(10).probe(WEB_DOWN)
    assert node.restarts() == (1 if restarted else 0)
    assert node.status()["restarts_in_window"] == (1 if restarted else 0)


def test_the_first_pass_creates_quay_when_there_is_none():
    node = Node().start()
    assert node.first_pass_mutations == ["create_and_start"]
    found = node.docker.named("quay")
    assert found.status == "running" and found.labels[STACK_VERSION] == V1.version
    assert node.daemon.live.container_id == found.id


# --- restarts -------------------------------------------------------------------------------

def test_a_crash_a_moment_after_the_first_pass_is_restarted_and_counted_however_late_told():
    node = Node().start()  # the first pass's own start is dated before it was done
    node.after(0.2).docker.crash("quay", 137)  # CI: `docker kill` right after /status healthy
    node.after(0.5).pump()
    assert node.restarts() == 1 and node.status()["restarts_in_window"] == 1
    assert node.docker.named("quay").status == "running"


def test_a_die_restarts_quay_once_and_its_echo_is_not_another_restart():
    node = Node().start().after(5)
    node.docker.crash("quay", 137)
    with captured_logs() as logs:
        node.pump()  # die: the agent starts the exited container
        node.after(1).pump()  # the start that caused
    assert node.restarts() == 1
    assert node.docker.named("quay").status == "running"
    assert node.status()["restarts_in_window"] == 1
    assert not events(logs, "container.restarted_by_docker")
    assert "137" in events(logs, "container.restarting")[0]["reason"]

    # A second, real crash after the echoes is news: restarted when the backoff allows.
    node.after(3).docker.crash("quay", 1)
    node.pump()
    assert node.restarts() == 1  # backoff_initial (10s) since the last restart
    node.after(6).tick()
    assert node.restarts() == 2
    assert node.docker.named("quay").status == "running"
    assert node.status()["restarts_in_window"] == 2


def test_failing_probes_restart_a_running_quay_and_its_die_and_start_are_echoes():
    node = Node().start().after(400)  # past the start period
    node.probe(WEB_DOWN)
    node.after(10).probe(WEB_DOWN)
    assert node.restarts() == 1
    with captured_logs() as logs:
        node.after(2).pump()  # Docker's die and start of that restart
    assert node.restarts() == 1
    assert node.status()["restarts_in_window"] == 1
    assert node.status()["state"] == "starting"
    assert not events(logs, "health.failing")
    assert not events(logs, "container.restarted_by_docker")


def test_a_die_that_dockers_restart_policy_already_handled_is_not_restarted_again():
    node = Node().start().after(5)
    quay = node.docker.named("quay").id
    node.docker.crash("quay", 1)
    node.docker.restarted_by_policy("quay")
    node.pump()  # die, then Docker's own start
    assert node.docker.mutations() == []  # the agent did not start or restart it
    assert node.docker.named("quay").id == quay and node.docker.named("quay").status == "running"
    assert node.status()["restarts_in_window"] == 1  # Docker's restart, counted once


def test_a_restart_that_fails_is_retried_at_the_next_due_tick():
    node = Node().start().after(5)
    node.docker.crash("quay", 1)
    node.docker.fail("restart_quay", RuntimeError("Cannot connect to the Docker daemon"))
    with captured_logs() as logs:
        node.pump()
    failed = events(logs, "container.restart_failed")
    assert failed and failed[0]["log_level"] == "error"
    assert "Cannot connect" in failed[0]["error"]
    assert node.docker.named("quay").status == "exited"

    node.after(5).tick()  # not due yet: backoff_initial is 10s
    assert node.docker.named("quay").status == "exited"
    node.after(5).tick()
    assert node.restarts() == 2
    assert node.docker.named("quay").status == "running"


def test_a_failed_restart_retried_after_dockers_own_restart_does_not_restart_quay_again():
    node = Node().start().after(5)
    node.docker.crash("quay", 1)
    node.docker.fail("restart_quay", RuntimeError("Cannot connect to the Docker daemon"))
    node.pump()  # die: the agent's restart fails
    node.docker.restarted_by_policy("quay")  # meanwhile Docker's policy starts it again
    node.after(1).pump()
    node.after(10).tick()  # the retry is due
    assert node.docker.mutations() == []  # running Quay left alone, as plan_restart's "none"


def test_a_missing_container_is_recreated_and_the_loop_follows_the_new_id():
    node = Node().start().after(5)
    old = node.daemon.live.container_id
    del node.docker.containers[old]
    node.docker.events.append(("quay", "destroy", None, node.wall()))
    node.pump()
    found = node.docker.named("quay")
    assert found is not None and found.status == "running" and found.id != old
    assert node.daemon.live.container_id == found.id


# --- escalation and recovery ----------------------------------------------------------------

def test_escalation_tells_every_target_once_and_recovery_clears_it():
    node = Node().start()
    for _ in range(4):  # four crashes, each once the backoff allows a restart
        node.after(25).docker.crash("quay", 1)
        node.pump()
        node.after(1).pump()  # the restart's echo
    node.wait_for_escalation()

    assert node.restarts() == 4
    for target in node.targets:
        assert len(target.marks) == 1, target.name
        assert "3 restarts" in target.marks[0]
    status = node.status()
    assert status["marked_unhealthy"] is True
    assert status["autoscaling_marked"] is True and status["on_unhealthy_marked"] is True

    node.after(30).probe(ALL_UP)
    assert node.status()["marked_unhealthy"] is False
    assert node.status()["state"] == "healthy"
    assert [t.clears for t in node.targets] == [1, 1]


def test_a_healthy_probe_marks_the_live_stack_known_good_and_tells_systemd_ready():
    node = Node().start()
    assert node.store.known_good() is None
    node.after(20).probe(ALL_UP)
    assert node.store.known_good() == V1.version
    assert node.status()["state"] == "healthy"
    assert node.status()["last_probe"]["ok"] is True
    assert node.systemd.said.count("READY=1") == 1
    node.after(10).probe(ALL_UP)
    assert node.systemd.said.count("READY=1") == 1


def test_a_shared_outage_does_not_restart_quay():
    node = Node().start().after(400)
    for _ in range(5):
        node.after(10).probe((("database", False), ("web_gunicorn", True)))
    assert node.restarts() == 0
    assert node.status()["state"] == "shared-outage"


# --- rolls ----------------------------------------------------------------------------------

def test_a_roll_that_applies_is_adopted_and_its_own_events_are_ignored():
    node = Node().start().after(20)
    node.probe(ALL_UP)
    node.release = V2
    node.roll("refresh")

    assert node.daemon.live.stack_version == V2.version
    assert node.daemon.live.container_id == node.docker.named("quay").id
    status = node.status()
    assert status["stack_version"] == V2.version and status["state"] == "starting"
    assert status["last_change"]["result"] == "applied"

    node.after(0.5).pump()  # the old container's die and the new one's start, delivered late
    assert node.restarts() == 0 and node.status()["restarts_in_window"] == 0

    node.after(0.1).docker.crash("quay", 1)  # a moment after the roll, a crash is a crash
    node.after(0.3).pump()
    assert node.restarts() == 1


def test_a_roll_that_raises_keeps_the_old_live_and_says_failed():
    node = Node().start().after(20)
    live = node.daemon.live
    node.release = V2
    node.prepare_error = Unavailable("the stack source did not answer", where="file:///srv")
    with captured_logs() as logs:
        node.roll("refresh")
    failed = events(logs, "rollout.failed")
    assert failed and failed[0]["log_level"] == "error" and failed[0]["why"] == "refresh"
    assert node.daemon.live is live
    assert node.status()["stack_version"] == V1.version
    assert node.status()["last_change"]["result"] == "failed"
    assert "did not answer" in node.status()["last_change"]["error"]
    assert node.docker.named("quay").labels[STACK_VERSION] == V1.version


def test_a_roll_that_rolls_back_counts_a_rollback_and_watches_the_old_stack():
    node = Node().start().after(20)
    node.release = V2
    node.verdicts = [False, True]
    node.roll("SIGHUP")
    assert node.daemon.live.stack_version == V1.version
    assert node.daemon.live.container_id == node.docker.named("quay").id
    assert node.docker.named("quay").labels[STACK_VERSION] == V1.version
    assert node.status()["last_change"]["result"] == "rolled back"
    assert node.board.registry.get_sample_value("quay_bootstrap_rollbacks_total") == 1


def test_a_crash_during_a_refresh_that_changes_nothing_is_restarted():
    node = Node().start().after(20)
    node.docker.crash("quay", 137)  # while the refresh is fetching the stack
    node.after(3)  # the fetch took 3s
    node.roll("refresh")  # nothing to roll: the crash is not its echo
    node.pump()
    assert node.restarts() == 1
    assert node.docker.named("quay").status == "running"


def test_the_periodic_refresh_rolls_a_new_stack_when_due():
    node = Node().start()  # stack.refresh_interval: 60s, jittered by 20%
    node.release = V2
    node.after(47)
    assert node.daemon.refresh.run_if_due() is False
    assert node.status()["stack_version"] == V1.version
    node.after(26)
    assert node.daemon.refresh.run_if_due() is True
    node.settle()
    assert node.status()["stack_version"] == V2.version
    assert node.docker.named("quay").labels[STACK_VERSION] == V2.version
    assert node.daemon.refresh.due_at > node.clock() + 47


def test_a_canary_held_after_migrating_is_out_of_service_until_a_fix_applies():
    from tests.fakes import V3

    node = Node().start().after(20)
    node.release = V3

    def migrated_then_failed(container_id):
        node.docker.containers[container_id].logs = "... conf/init/runmigration.sh ...\n"
        return False

    node.verdicts = [migrated_then_failed]
    node.roll("refresh")
    status = node.status()
    assert (status["state"], status["marked_unhealthy"]) == ("held", True)  # /healthz 503
    assert "docker logs" in status["marked_reason"]
    assert node.docker.named("quay").labels[STACK_VERSION] == V3.version  # kept, not rolled back
    assert node.targets[0].marks == []  # not the Auto Scaling group's business: a human's

    node.roll("refresh")  # the same source: still held
    assert node.status()["state"] == "held"
    node.release, node.verdicts = V2, []  # the fix (a new stack on the old image) applies
    node.roll("refresh")
    assert node.daemon.held is None and node.status()["marked_unhealthy"] is False
    quay = node.docker.named("quay")  # the old image, started without migrating
    assert quay.labels[STACK_VERSION] == V2.version and quay.spec.command == ("registry-nomigrate",)


def test_a_node_behind_the_migrated_database_leaves_restarts_to_the_agent_and_says_degraded():
    from tests.fakes import V3

    node = Node().start().after(20)
    quay = node.docker.named("quay")
    node.leases.put("database", {"image": V3.digest, "tag": V3.tag, "at": 0})
    node.roll("refresh")
    assert node.docker.named("quay").id == quay.id  # still serving, untouched
    assert quay.restart_policy == "no"  # Docker would restart it with `registry`
    assert "rolled forward" in node.status()["degraded"]
    node.docker.crash("quay", 137)
    node.pump()
    restarted = node.docker.named("quay")
    assert restarted.status == "running" and restarted.spec.command == ("registry-nomigrate",)


# --- the budget covers restarts too; the watch goes on while a roll waits --------------------

def test_restarting_a_running_but_failing_quay_takes_a_slot_of_the_budget():
    node = Node().start().after(400)
    node.leases.put("lease-0", LeaseBody("node-b", node.clock() + 60, "rolling").encode())
    with captured_logs() as logs:
        node.probe(WEB_DOWN)
        node.after(10).probe(WEB_DOWN)
    assert node.docker.mutations() == []  # node-b is out of service: this one waits
    assert "budget" in events(logs, "container.restart_deferred")[0]["reason"]
    assert node.status()["restarts_in_window"] == 0  # not a restart: no nearer to escalation
    for _ in range(6):  # waiting for the budget for minutes never marks the node unhealthy
        node.after(10).probe(WEB_DOWN)
    assert node.targets[0].marks == [] and node.status()["marked_unhealthy"] is False
    node.after(61).tick()  # node-b's slot is free again
    assert node.restarts() == 1
    assert LeaseBody.decode(node.leases.objects["lease-0"][0]).holder == "node-a/restart"
    node.after(5).pump()
    node.probe(ALL_UP)  # healthy again: the slot goes back
    assert node.leases.leases() == {}


def test_a_quay_that_exited_comes_back_at_once_even_when_the_budget_is_spent():
    node = Node().start().after(400)
    node.leases.put("lease-0", LeaseBody("node-b", node.clock() + 600, "rolling").encode())
    node.docker.crash("quay", 137)
    node.pump()
    assert node.restarts() == 1 and node.docker.named("quay").status == "running"


def test_while_a_roll_waits_for_a_lease_a_crash_is_still_restarted():
    """The roll runs beside the loop: waiting for node-b's lease blocks only the roll."""
    import threading as threads

    node = Node()
    node.daemon.node.spawn = lambda roll: threads.Thread(target=roll, daemon=True).start()
    node.start().after(20)
    node.leases.put("lease-0", LeaseBody("node-b", node.clock() + 30, "rolling").encode())
    waiting, go_on = threads.Event(), threads.Event()

    def hold_the_roll(clock):
        waiting.set()
        go_on.wait(5)
    node.clock.on_sleep = hold_the_roll
    node.release = V2
    node.daemon._roll(node.daemon.cfg, "refresh")
    assert waiting.wait(5)  # the roll waits for the lease ...
    node.docker.crash("quay", 137)
    node.pump()  # ... and the loop restarts the crashed Quay meanwhile
    assert node.restarts() == 1 and node.docker.named("quay").status == "running"
    node.clock.on_sleep = None
    node.clock.advance(31)
    go_on.set()
    outcome = node.daemon.events.get(timeout=5)
    node.daemon.handle(outcome)
    assert node.docker.named("quay").labels[STACK_VERSION] == V2.version


def _first_start(node):
    from tests.fakes import V3

    node.docker.containers.clear()
    node.release = V3
    return node.start()


def test_a_first_start_that_is_the_canary_is_judged_by_the_watch_healthy():
    node = _first_start(Node())
    assert node.leases.record()["state"] == "rolling"  # the start was not held up
    node.after(5).probe(ALL_UP)
    assert node.leases.record()["state"] == "healthy"


def test_a_first_start_that_fails_leaves_the_version_open_for_the_next_node():
    node = _first_start(Node())
    quay = node.docker.named("quay")
    quay.logs = "Running init script '/quay-registry/conf/init/runmigration.sh'\n"
    node.after(400).probe(WEB_DOWN)
    node.after(10).probe(WEB_DOWN)  # failing after its start period
    assert node.leases.record()["state"] == "open"  # not "failed": this node may be at fault
    assert node.daemon.held is None  # no older Quay to protect: the watchdog restarts it
    import json
    assert json.loads(node.leases.objects["database"][0])["tag"] == "v3.10.0"


# --- the loop's threads are kept running ----------------------------------------------------

def test_a_prober_whose_run_raises_is_restarted_by_the_loop_and_probing_goes_on():
    from prometheus_client import generate_latest

    from quay_bootstrap.supervise import CHECK_THREADS_EVERY

    node = Node().start()
    daemon = node.daemon
    runs, probing = [], threading.Event()

    def run():
        runs.append(node.clock())
        if len(runs) == 1:
            raise RuntimeError("can't start new thread")
        probing.set()
        daemon.stop.wait()  # probes until stop, as Prober.run does

    daemon.prober.run = run
    daemon._watch_docker = daemon.stop.wait  # the real one loops until stop
    daemon.tend()  # a check if one is due now; the next one CHECK_THREADS_EVERY later
    daemon._start_threads()
    probe = daemon.threads.threads["probe"].thread
    probe.join(5)
    assert not probe.is_alive()  # the first run died
    with captured_logs() as logs:
        daemon.tend()
        assert not events(logs, "agent.thread_restarted")  # not before the next check
        node.after(CHECK_THREADS_EVERY)
        daemon.tend()
        assert probing.wait(5)  # the second run probes

    restarted = events(logs, "agent.thread_restarted")
    assert len(restarted) == 1
    assert restarted[0]["log_level"] == "warning" and restarted[0]["thread"] == "probe"
    assert restarted[0]["error"] == "RuntimeError: can't start new thread"
    assert isinstance(restarted[0]["exc_info"], RuntimeError)  # its traceback, in the same line
    metric = "quay_bootstrap_thread_restarts_total"
    assert node.board.registry.get_sample_value(metric, {"thread": "probe"}) == 1
    assert node.board.registry.get_sample_value(metric, {"thread": "docker-events"}) == 0
    assert f'{metric}{{thread="probe"}} 1.0' in generate_latest(node.board.registry).decode()

    daemon.request_stop()  # ends the second run: not a death
    for each in daemon.threads.threads.values():
        each.thread.join(5)
        assert not each.thread.is_alive()
    node.after(600)
    with captured_logs() as logs:
        assert daemon.threads.check() == []
    assert not events(logs, "agent.thread_restarted")
    assert len(runs) == 2


def test_a_thread_that_ends_because_stop_was_set_is_not_restarted():
    from quay_bootstrap.supervise import Supervisor

    clock, stop = FakeClock(), threading.Event()
    threads = Supervisor(stop, clock, Board().m_thread_restarts)
    threads.start("docker-events", stop.wait)
    stop.set()
    ended = threads.threads["docker-events"]
    ended.thread.join(5)
    assert not ended.thread.is_alive()
    assert ended.ended is not None and ended.ended.stopping and ended.ended.error is None
    clock.advance(600)
    assert threads.check() == []


def test_a_thread_that_keeps_dying_is_restarted_ever_later():
    from quay_bootstrap.supervise import Supervisor

    clock, stop, board = FakeClock(), threading.Event(), Board()
    threads = Supervisor(stop, clock, board.m_thread_restarts)

    def run():
        raise ValueError("no health.url")

    waits = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]  # it dies as soon as it starts
    with captured_logs() as logs:
        threads.start("probe", run)
        for wait in waits:
            dead = threads.threads["probe"]
            dead.thread.join(5)
            assert not dead.thread.is_alive()
            clock.now = dead.ended.at + wait - 0.1
            assert threads.check() == []  # still waiting
            clock.now = dead.ended.at + wait
            assert threads.check() == ["probe"]
    restarted = events(logs, "agent.thread_restarted")
    assert [e["backoff_seconds"] for e in restarted] == waits
    assert all(e["error"] == "ValueError: no health.url" for e in restarted)
    assert board.registry.get_sample_value("quay_bootstrap_thread_restarts_total",
                                           {"thread": "probe"}) == len(waits)


BOOM = RuntimeError("boom")


def _ended(at=100.0, error=BOOM, stopping=False):
    from quay_bootstrap.supervise import Ended

    return Ended(at, error, stopping)


@pytest.mark.parametrize("started_at,ended,delay,finishes,stopping,now,due", [
    # alive: nothing to do
    (0.0, None, 0.0, False, False, 500.0, []),
    # died after a long run: restarted at once
    (0.0, _ended(), 0.0, False, False, 100.0, [("t", 0.0)]),
    # died soon after its start: 1 s later, then twice the previous wait, up to 60 s
    (99.0, _ended(), 0.0, False, False, 100.5, []),
    (99.0, _ended(), 0.0, False, False, 101.0, [("t", 1.0)]),
    (99.0, _ended(), 8.0, False, False, 115.0, []),
    (99.0, _ended(), 8.0, False, False, 116.0, [("t", 16.0)]),
    (99.0, _ended(), 60.0, False, False, 160.0, [("t", 60.0)]),
    # a thread meant to run until stop that returned is dead too
    (0.0, _ended(error=None), 0.0, False, False, 100.0, [("t", 0.0)]),
    # one that may finish (the lifecycle watcher) returned: done; raised: dead
    (0.0, _ended(error=None), 0.0, True, False, 500.0, []),
    (0.0, _ended(), 0.0, True, False, 100.0, [("t", 0.0)]),
    # ended as stop was set, or the agent is stopping now: never restarted
    (0.0, _ended(stopping=True), 0.0, False, False, 500.0, []),
    (0.0, _ended(), 0.0, False, True, 500.0, []),
])
def test_which_threads_to_restart_now(started_at, ended, delay, finishes, stopping, now, due):
    from quay_bootstrap.supervise import Seen, restarts_due

    assert restarts_due([Seen("t", started_at, ended, delay, finishes)], now, stopping) == due


def test_only_the_dead_threads_are_restarted():
    from quay_bootstrap.supervise import Seen, restarts_due

    seen = [Seen("probe", 0.0, _ended()), Seen("docker-events", 0.0),
            Seen("lifecycle", 0.0, _ended(error=None), finishes=True)]
    assert restarts_due(seen, 100.0, stopping=False) == [("probe", 0.0)]
