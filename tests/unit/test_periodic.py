"""Periodic work and rate-limited warnings (periodic.py), on a fake clock: when a job runs, how
its failures are logged, and that it never raises into the loop."""
from __future__ import annotations

import pytest

from quay_bootstrap.periodic import Periodic, Warnings
from tests.fakes import FakeClock, captured_logs, events


class Job:
    def __init__(self, errors=()):
        self.runs = 0
        self.errors = list(errors)  # raised by the next runs, in order; None = succeed

    def __call__(self):
        self.runs += 1
        if self.errors:
            error = self.errors.pop(0)
            if error is not None:
                raise error


# --- Periodic -------------------------------------------------------------------------------

def test_runs_when_due_and_then_every_period():
    clock, job = FakeClock(), Job()
    every = Periodic("job.failed", job, 60, clock=clock)
    assert every.seconds_left() == 60
    clock.advance(59.9)
    assert every.run_if_due() is False and job.runs == 0
    clock.advance(0.1)
    assert every.run_if_due() is True and job.runs == 1
    assert every.run_if_due() is False  # the next is a whole period later
    clock.advance(60)
    assert every.run_if_due() is True and job.runs == 2


def test_first_sets_the_first_run():
    clock, job = FakeClock(), Job()
    every = Periodic("job.failed", job, 60, first=0, clock=clock)
    assert every.run_if_due() is True and job.runs == 1
    assert every.seconds_left() == 60


@pytest.mark.parametrize("period", [0, None])
def test_no_period_never_runs(period):
    clock, job = FakeClock(), Job()
    every = Periodic("job.failed", job, period, first=0, clock=clock)
    clock.advance(1e9)
    assert every.run_if_due() is False and job.runs == 0
    assert every.due_at is None and every.seconds_left() is None


@pytest.mark.parametrize("pick,expected", [(min, 48.0), (max, 72.0)])
def test_jitter_spreads_runs_within_its_bounds(pick, expected):
    clock, asked = FakeClock(), []

    def uniform(low, high):
        asked.append((low, high))
        return pick(low, high)

    every = Periodic("job.failed", Job(), 60, jitter=0.2, clock=clock, uniform=uniform)
    assert every.seconds_left() == pytest.approx(expected)
    clock.advance(expected)
    every.run_if_due()
    assert every.seconds_left() == pytest.approx(expected)
    assert asked == [pytest.approx((0.8, 1.2))] * 2


def test_errors_are_caught_logged_once_and_the_job_stays_scheduled():
    clock = FakeClock()
    job = Job([RuntimeError("store down")] * 3 + [None])
    every = Periodic("job.failed", job, 60, first=0, clock=clock)
    with captured_logs() as logs:
        for _ in range(3):  # raises three times: never into the caller
            assert every.run_if_due() is True
            clock.advance(60)
        assert every.run_if_due() is True  # works again
    failed = events(logs, "job.failed")
    assert [(e["log_level"], e["error"]) for e in failed] == [("warning", "store down")]
    recovered = events(logs, "job.failed_recovered")
    assert [e["after_repeats"] for e in recovered] == [2]
    assert job.runs == 4 and every.seconds_left() == 60


def test_an_error_that_lasts_is_logged_again_after_an_hour():
    clock = FakeClock()
    every = Periodic("job.failed", Job([RuntimeError("store down")] * 100), 600, first=0,
                     clock=clock)
    with captured_logs() as logs:
        for _ in range(7):  # 0s, 600s, ..., 3600s
            every.run_if_due()
            clock.advance(600)
    assert [e["repeated"] for e in events(logs, "job.failed")] == [0, 5]


def test_cancel_stops_the_runs():
    clock, job = FakeClock(), Job()
    every = Periodic("job.failed", job, 60, first=0, clock=clock)
    every.cancel()
    clock.advance(3600)
    assert every.run_if_due() is False and job.runs == 0
    assert every.seconds_left() is None


# --- Warnings -------------------------------------------------------------------------------

def test_a_warning_is_logged_once_per_change_of_its_kind():
    clock = FakeClock()
    warnings = Warnings("docker.events_lost", clock=clock)
    with captured_logs() as logs:
        logged = [warnings.warn(ConnectionError("refused")),
                  warnings.warn(ConnectionError("refused")),
                  warnings.warn(ConnectionError("refused")),
                  warnings.warn(TimeoutError("timed out")),
                  warnings.warn(ConnectionError("refused"))]
    assert logged == [True, False, False, True, True]
    lines = events(logs, "docker.events_lost")
    assert [(e["error"], e["repeated"]) for e in lines] == \
        [("refused", 0), ("timed out", 2), ("refused", 0)]
    assert {e["log_level"] for e in lines} == {"warning"}


def test_the_same_warning_is_logged_again_after_every():
    clock = FakeClock()
    warnings = Warnings("docker.events_lost", every=300, clock=clock)
    with captured_logs() as logs:
        assert warnings.warn(ConnectionError("refused")) is True
        clock.advance(299)
        assert warnings.warn(ConnectionError("refused")) is False
        clock.advance(1)
        assert warnings.warn(ConnectionError("refused")) is True
    assert [e["repeated"] for e in events(logs, "docker.events_lost")] == [0, 1]


def test_ok_resets_so_the_next_failure_is_news():
    clock = FakeClock()
    warnings = Warnings("docker.events_lost", clock=clock)
    with captured_logs() as logs:
        warnings.ok()  # nothing had failed: nothing to say
        warnings.warn(ConnectionError("refused"))
        warnings.warn(ConnectionError("refused"))
        warnings.ok()
        warnings.ok()
        assert warnings.warn(ConnectionError("refused")) is True
    assert [e["after_repeats"] for e in events(logs, "docker.events_lost_recovered")] == [1]
    assert len(events(logs, "docker.events_lost")) == 2
