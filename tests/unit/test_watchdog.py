"""The watchdog's decisions from tables, with a fake clock: when to restart, when to escalate,
and above all when NOT to act."""
from __future__ import annotations

import pytest

from quay_bootstrap.watchdog import (
    ClearUnhealthy,
    Died,
    Log,
    MarkUnhealthy,
    Missing,
    Policy,
    Probed,
    Ready,
    Restart,
    Started,
    State,
    Tick,
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
        done += [(event.at, a) for a in actions if not isinstance(a, Log)]
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
    assert done == [(3, Restart("the container exited (code 137)"))]


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
