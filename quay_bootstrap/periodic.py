"""Periodic work and repeated warnings: one helper for every "do this every N seconds" of the agent.

Modelled on WALinuxAgent's PeriodicOperation: the operation's own errors are caught (a periodic
job never kills the loop), the same failure is logged once per change of its kind or once per
`warn_every`, and the next run is jittered so a cluster's nodes do not act in the same second.
"""
from __future__ import annotations

import random
import time
from typing import Callable, Optional

import structlog

log = structlog.get_logger(__name__)


class Warnings:
    """Logs a failure when its kind changes or `every` seconds after it was last logged; the
    repeats in between are counted and reported with the next line."""

    def __init__(self, event: str, every: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.event = event
        self.every = every
        self.clock = clock
        self._kind: Optional[str] = None
        self._logged_at = float("-inf")
        self._repeats = 0

    def warn(self, err: BaseException, **fields) -> bool:
        """Returns whether this one was logged."""
        kind = f"{type(err).__name__}: {err}"
        now = self.clock()
        if kind == self._kind and now - self._logged_at < self.every:
            self._repeats += 1
            return False
        log.warning(self.event, error=str(err), repeated=self._repeats, **fields)
        self._kind, self._logged_at, self._repeats = kind, now, 0
        return True

    def ok(self) -> None:
        """The operation worked again: the next failure is news."""
        if self._kind is not None:
            log.info(self.event + "_recovered", after_repeats=self._repeats)
        self._kind, self._repeats = None, 0


class Periodic:
    """Runs `operation` when due, then schedules the next run `period` later (times a random
    factor within 1 +/- `jitter`). A period of 0 or None never runs.

    Args:
        name: the log event for its failures (rate-limited).
        operation: what to run; its exceptions are caught and logged.
        period: seconds between runs.
        jitter: fraction of the period to spread runs by.
        first: seconds until the first run (default: one jittered period).
    """

    def __init__(self, name: str, operation: Callable[[], object], period: Optional[float], *,
                 jitter: float = 0.0, first: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic,
                 uniform: Callable[[float, float], float] = random.uniform) -> None:
        self.operation = operation
        self.period = period or 0.0
        self.jitter = jitter
        self.clock = clock
        self.uniform = uniform
        self.warnings = Warnings(name, clock=clock)
        self.due_at: Optional[float] = None
        if self.period > 0:
            self.due_at = clock() + (self._next() if first is None else first)

    def _next(self) -> float:
        return self.period * (self.uniform(1 - self.jitter, 1 + self.jitter) if self.jitter else 1)

    def run_if_due(self) -> bool:
        """Run when due; returns whether it ran."""
        if self.due_at is None or self.clock() < self.due_at:
            return False
        self.run_now()
        return True

    def run_now(self) -> None:
        try:
            self.operation()
            self.warnings.ok()
        except Exception as err:  # noqa: BLE001 - a periodic job must not end the loop
            self.warnings.warn(err)
        finally:
            if self.period > 0:
                self.due_at = self.clock() + self._next()

    def cancel(self) -> None:
        self.due_at = None

    def seconds_left(self) -> Optional[float]:
        return None if self.due_at is None else max(0.0, self.due_at - self.clock())
