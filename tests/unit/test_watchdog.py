"""The watchdog's decisions from tables, with a fake clock: when to restart, when to escalate,
and above all when NOT to act."""
from __future__ import annotations

from dataclasses import replace

import pytest

from quay_bootstrap.watchdog import (
    Applied,
    ClearUnhealthy,
    Died,
    Expect,
    Log,
    MarkKnownGood,
    MarkUnhealthy,
    Missing,
    Policy,
    Probed,
    Ready,
    Restart,
    RestartFailed,
    Started,
    State,
    Tick,
    event_at,
    from_docker,
    step,
)

POLICY = Policy(start_period=30, failure_threshold=3, success_threshold=1, backoff_initial=10,
                backoff_max=80, unhealthy_after=3, window=600,
                shared_services=frozenset({"database", "redis", "storage", "auth"}))
OK = (("database", True), ("web_gunicorn", True))
DB_DOWN = (("database", False), ("web_gunicorn", True))
WEB_DOWN = (("database", True), ("web_gunicorn", False))
DB_AND_WEB_DOWN = (("database", False), ("web_gunicorn", False))


def run(events, state=None, policy=POLICY):
    """Feed events in order; return the final state and every action, tagged with its time."""
    state = state or State(started_at=0.0)
    done = []
    for event in events:
        state, actions = step(state, event, policy)
        done += [(event.at, a) for a in actions if not isinstance(a, (Log, MarkKnownGood))]
    return state, done


def ok(at):
    return Probed(at, True, OK, status=200)


def bad(at, services=WEB_DOWN, **kw):
    return Probed(at, False, services, error="HTTP 503", status=503, **kw)


def test_healthy_after_start_says_ready_once():
    state, done = run([ok(5), ok(15), ok(25)])
    assert state.phase == "healthy"
    assert done == [(5, Ready())]


def test_failures_during_start_period_do_not_count():
    state, done = run([bad(5), bad(10), bad(15), bad(20), bad(25)])
    assert state.phase == "starting" and state.failures == 0 and done == []


def test_threshold_consecutive_failures_restart_at_once():
    state, done = run([ok(5), bad(40), bad(50), bad(60)])
    assert done == [(5, Ready()), (60, Restart("3 failed probes: HTTP 503"))]
    assert state.phase == "starting" and state.backoff == 10


def test_a_success_in_between_resets_the_count():
    _, done = run([ok(5), bad(40), bad(50), ok(55), bad(60), bad(70)])
    assert [a for _, a in done if isinstance(a, Restart)] == []


def test_a_container_exit_always_counts_even_while_starting():
    state, done = run([Died(3, exit_code=137)])
    assert done == [(3, Restart("the container exited (code 137)", exited=True))]


def test_backoff_doubles_to_the_maximum_and_restarts_wait_for_it():
    policy = Policy(**{**vars(POLICY), "unhealthy_after": 99})
    state, done = run([Died(1), Died(2), Tick(5), Tick(11)], policy=policy)
    assert [t for t, a in done if isinstance(a, Restart)] == [1, 11]
    assert state.backoff == 20
    events = [Died(12), Tick(31), Died(32), Tick(71), Died(72), Tick(151), Died(152), Tick(232)]
    state, done = run(events, state, policy)
    assert [t for t, a in done if isinstance(a, Restart)] == [31, 71, 151, 232]
    assert state.backoff == 80


def test_escalation_marks_unhealthy_exactly_once_per_episode_then_clears():
    events = [Died(1), Died(2), Tick(11), Died(12), Tick(31), Died(32), Tick(111), Died(112),
              Tick(192)]
    state, done = run(events)
    marks = [t for t, a in done if isinstance(a, MarkUnhealthy)]
    assert marks == [31]
    assert state.marked and state.backoff == 80  # keeps trying at the slowest pace
    state, done = run([ok(200)], state)
    assert [a for _, a in done] == [ClearUnhealthy(), Ready()]
    assert not state.marked


def test_restarts_outside_the_window_do_not_escalate():
    policy = Policy(**{**vars(POLICY), "window": 15, "backoff_initial": 1, "backoff_max": 1})
    _, done = run([Died(1), Died(20), Died(40), Died(60)], policy=policy)
    assert [a for _, a in done if isinstance(a, MarkUnhealthy)] == []


@pytest.mark.parametrize("services", [DB_DOWN, (("redis", False),), (("auth", False), ("storage", False))])
def test_shared_service_outage_never_restarts_or_marks(services):
    state, done = run([ok(5)] + [bad(40 + 10 * i, services) for i in range(20)])
    assert state.phase == "shared-outage"
    assert [a for _, a in done] == [Ready()]


def test_a_shared_outage_clears_and_normal_handling_resumes():
    state, _ = run([ok(5), bad(40, DB_DOWN), bad(50, DB_DOWN), ok(60)])
    assert state.phase == "healthy"
    state, done = run([bad(100), bad(110), bad(120)], state)
    assert [a for _, a in done if isinstance(a, Restart)] != []


def test_a_local_failure_next_to_a_shared_one_is_this_nodes_problem():
    _, done = run([ok(5), bad(40, DB_AND_WEB_DOWN), bad(50, DB_AND_WEB_DOWN),
                   bad(60, DB_AND_WEB_DOWN)])
    assert [a for _, a in done if isinstance(a, Restart)]


@pytest.mark.parametrize("probe", [
    Probed(0, False, (), error="timed out after 5s"),  # a hang
    Probed(0, False, (), error="HTTP 502", status=502),  # not Quay's body
])
def test_timeouts_and_foreign_bodies_are_local_failures(probe):
    probes = [Probed(40 + i * 10, probe.ok, probe.services, probe.error, probe.status)
              for i in range(3)]
    _, done = run([ok(5), *probes])
    assert [a for _, a in done if isinstance(a, Restart)]


@pytest.mark.parametrize("rds_unavailable,services,restarts", [
    (True, DB_DOWN, False),            # RDS failover: not this node's problem
    (False, DB_DOWN, True),            # RDS says available: the database check is real
    (True, DB_AND_WEB_DOWN, True),     # web_gunicorn is still this node's problem
])
def test_rds_status_when_the_database_is_not_a_shared_service(rds_unavailable, services,
                                                              restarts):
    policy = Policy(**{**vars(POLICY), "shared_services": frozenset({"redis"})})
    events = [ok(5)] + [bad(40 + 10 * i, services, rds_unavailable=rds_unavailable)
                        for i in range(5)]
    _, done = run(events, policy=policy)
    assert bool([a for _, a in done if isinstance(a, Restart)]) is restarts


def test_docker_restarting_the_container_counts_once_and_cancels_ours():
    policy = Policy(**{**vars(POLICY), "unhealthy_after": 99})
    state, done = run([ok(5), Died(100), Started(100.2), Died(101), Started(101.1), Tick(130)],
                      policy=policy)
    restarts = [t for t, a in done if isinstance(a, Restart)]
    assert restarts == [100]  # ours; Docker's echo of it is not another
    assert len(state.restarts) == 2  # our restart at 100, Docker's at 101.1
    assert state.pending is None


def test_a_missing_container_is_recreated():
    _, done = run([ok(5), Missing(50)])
    assert done[-1] == (50, Restart("the container is missing", recreate=True))


def test_backoff_resets_after_ten_minutes_healthy():
    state, _ = run([Died(1), ok(40)])
    assert state.backoff == 10
    state, _ = run([ok(700)], state)
    assert state.backoff == 0 and state.restarts == ()


# --- what the daemon used to decide itself: echoes of its own acts, applied changes ---------

def test_healthy_marks_the_stack_known_good_once_per_episode():
    state, actions = State(started_at=0.0), []
    for event in [ok(5), ok(15), bad(40), bad(50), bad(60), ok(70), ok(80)]:
        state, more = step(state, event, POLICY)
        actions += [(event.at, a) for a in more if isinstance(a, MarkKnownGood)]
    # Once on the first healthy answer, once again when healthy after the restart.
    assert actions == [(5, MarkKnownGood()), (70, MarkKnownGood())]


def test_echo_of_our_own_restart_is_consumed_once_and_a_real_crash_after_it_counts():
    state, _ = run([ok(5)])
    state, _ = step(state, Expect(10, until=50, kinds=("die", "start")), POLICY)
    state, done = run([Died(11, 137), Started(12)], state)
    assert done == [] and state.restarts == () and state.echoes == ()
    # The expected echoes are used up: the next die is a real crash.
    state, done = run([Died(13, 1)], state)
    assert done == [(13, Restart("the container exited (code 1)", exited=True))]


def test_unconsumed_echoes_expire():
    state, _ = run([ok(5)])
    state, _ = step(state, Expect(10, until=20, kinds=("die",)), POLICY)
    state, done = run([Died(25, 1)], state)
    assert [a for _, a in done] == [Restart("the container exited (code 1)", exited=True)]


@pytest.mark.parametrize("event", [Died(15, 0), Started(15), Missing(15)])
def test_everything_until_the_end_of_a_roll_is_the_roll_s_own(event):
    state, _ = run([ok(5)])
    state, _ = step(state, Expect(10, until=16, everything=True), POLICY)
    after, done = step(state, event, POLICY)
    assert done == [] and after == state


def test_a_drain_silences_every_later_event():
    state, _ = run([ok(5)])
    state, _ = step(state, Expect(10, until=float("inf"), everything=True), POLICY)
    state, done = run([Died(1e6, 0), Missing(1e6 + 1)], state)
    assert done == [] and state.phase == "healthy"


def test_applied_starts_a_fresh_watch_with_the_container_s_age():
    state, _ = run([ok(5), bad(40), bad(50)])
    assert state.failures == 2
    # An adopted container that started 100 s ago gets no fresh start period.
    state, done = step(state, Applied(200, started_at=100, quiet_until=201), POLICY)
    assert done == [] and state.phase == "starting" and state.failures == 0
    state, done = run([bad(202), bad(210), bad(220)], state)
    assert [a for _, a in done] == [Restart("3 failed probes: HTTP 503")]


def test_applied_silences_the_change_s_own_events():
    state, _ = step(State(), Applied(10, started_at=10, quiet_until=11), POLICY)
    state, done = run([Died(10.5, 0), Started(10.6)], state)
    assert done == [] and state.restarts == ()


def test_a_failed_restart_is_due_again_at_the_next_tick():
    state, _ = run([ok(5), bad(40), bad(50), bad(60)])
    state, actions = step(state, RestartFailed(61, "dockerd is gone"), POLICY)
    assert state.pending == "dockerd is gone"
    assert [a.event for a in actions if isinstance(a, Log)] == ["container.restart_failed"]
    state, done = run([Tick(61 + POLICY.backoff_initial)], state)
    assert [a for _, a in done] == [Restart("dockerd is gone")]


@pytest.mark.parametrize("when, at", [
    (999.75, 99.75),  # Docker's time: however late the stream told it
    (1000.5, 100.0),  # a wall clock a little behind Docker's: never in the future
    (None, 99.0),  # no time given: taken as UNTIMED_AGE old, so a late echo is still known
])
def test_a_docker_event_is_dated_when_docker_says_it_happened(when, at):
    assert event_at(100.0, 1000.0, when) == at


@pytest.mark.parametrize("action, code, expected", [
    ("die", 137, Died(1.0, 137)), ("die", None, Died(1.0, None)),
    ("start", None, Started(1.0)), ("destroy", None, Missing(1.0))])
def test_docker_events_become_observations(action, code, expected):
    assert from_docker(action, code, 1.0) == expected


@pytest.mark.parametrize("probe, restarts", [
    # /health/instance timed out or answered an error without Quay's body (JWT auth raising) while
    # both gunicorns answered Quay's own ping: a slow or failing shared check.
    (Probed(0, False, (), error="timed out after 35s", gunicorns_alive=True), False),
    (Probed(0, False, (), error="HTTP 500", status=500, gunicorns_alive=True), False),
    (Probed(0, False, (), error="HTTP 502", status=502, gunicorns_alive=True), False),  # real Quay
    # The same without the pings: a hung or dead gunicorn of this node.
    (Probed(0, False, (), error="timed out after 35s"), True),
    (Probed(0, False, (), error="HTTP 500", status=500), True),
    # Quay's own 2 s check of a gunicorn failed while every database round trip took 8 s (real
    # Quay, test_real_cluster): the same ping given the probe's timeout answered: busy workers.
    (Probed(0, False, (("database", True), ("web_gunicorn", False)), status=503,
            gunicorns_alive=True), False),
    (Probed(0, False, (("registry_gunicorn", False), ("web_gunicorn", False)), status=503,
            gunicorns_alive=True), False),
    # It did not answer: hung or dead.
    (Probed(0, False, (("database", True), ("web_gunicorn", False)), status=503), True),
    # Something besides a gunicorn failed: this node's, whatever the pings say.
    (Probed(0, False, (("disk_space", False), ("web_gunicorn", False)), status=503,
            gunicorns_alive=True), True),
])
def test_while_quay_s_own_pings_answer_a_failure_is_shared(probe, restarts):
    probes = [replace(probe, at=40 + i * 10) for i in range(6)]
    state, done = run([ok(5), *probes])
    assert bool([a for _, a in done if isinstance(a, Restart)]) is restarts
    if not restarts:
        assert state.phase == "shared-outage"
        assert not [a for _, a in done if isinstance(a, MarkUnhealthy)]
        state, done = run([ok(110)], state)  # it ends when Quay answers 200 again
        assert state.phase == "healthy"
