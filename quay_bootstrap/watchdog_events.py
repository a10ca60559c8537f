"""What the watchdog (watchdog.step) is fed and what it answers (pure data): observations of
Quay, of Docker and of the agent's own acts in; actions for the loop to carry out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

# --- observations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Probed:
    at: float
    ok: bool
    services: Tuple[Tuple[str, bool], ...] = ()
    error: str = ""
    status: Optional[int] = None
    rds_unavailable: bool = False  # report.rds set and RDS says the DB is not `available`
    # Quay's own pings (health.gunicorns_alive) answered after a probe that named no failing
    # service (timed out, or an error without Quay's body), or named only gunicorns (then
    # asked with the probe's timeout): both gunicorns live.
    gunicorns_alive: bool = False


# The services Quay's /health/instance checks by calling its gunicorns' own pings (health.PINGS).
GUNICORNS = frozenset({"web_gunicorn", "registry_gunicorn"})


@dataclass(frozen=True)
class Died:
    at: float
    exit_code: Optional[int] = None


@dataclass(frozen=True)
class Started:
    at: float


@dataclass(frozen=True)
class Missing:
    """The container is gone (removed by someone): recreate it."""

    at: float


@dataclass(frozen=True)
class Tick:
    at: float


@dataclass(frozen=True)
class Applied:
    """A pass or a roll put Quay's container in place (or adopted it): a fresh watch begins.

    `started_at`: when the container started (an adopted one keeps its age, so it is not given
    a fresh start period). Docker events that happened up to `quiet_until` (the moment the
    change was done) were caused by the change itself.
    """

    at: float
    started_at: float
    quiet_until: float


@dataclass(frozen=True)
class Expect:
    """The agent is about to act on the container itself: each of `kinds` ("die", "start",
    "destroy") is an echo of that act, consumed once, until `until`; with `everything`, every
    event up to `until` is (a roll that failed, a drain)."""

    at: float
    until: float
    kinds: Tuple[str, ...] = ()
    everything: bool = False


@dataclass(frozen=True)
class RestartDeferred:
    """The restart waits for a slot of the cluster's budget: it did not happen, it is not
    counted, and it is tried again after `backoff_initial`."""

    at: float
    reason: str


@dataclass(frozen=True)
class RestartFailed:
    """Docker refused the restart (of `restart`): it is due again at the next tick, unless
    Docker's restart policy brings Quay back first (its start event then counts)."""

    at: float
    reason: str
    restart: Optional["Restart"] = None


# --- actions --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Restart:
    """Restart Quay (recreate it when its container is gone)."""

    reason: str
    recreate: bool = False
    exited: bool = False  # caused by a die event: Docker's restart policy may already have acted


@dataclass(frozen=True)
class MarkUnhealthy:
    reason: str


@dataclass(frozen=True)
class ClearUnhealthy:
    pass


@dataclass(frozen=True)
class Ready:
    """The first healthy verdict since the agent started (systemd READY=1)."""


@dataclass(frozen=True)
class MarkKnownGood:
    """Quay answered healthy on the stack it mounts: the one to go back to."""


@dataclass(frozen=True)
class Log:
    event: str
    level: str = "info"
    fields: Tuple[Tuple[str, object], ...] = ()


# How old an event Docker gave no time for is taken to be: an echo of the agent's own act that
# the stream delivers up to this late is still known as one.
UNTIMED_AGE = 1.0


def event_at(now: float, wall_now: float, when: Optional[float]) -> float:
    """When a Docker event happened, on the agent's clock (`now`; `wall_now` is the wall clock
    read at the same moment): Docker's own time `when`, however late the stream delivered it.
    So an echo of an act the agent finished (every one happened before the act returned) is
    known as one, and a crash a moment after it is a crash."""
    if when is None:
        return now - UNTIMED_AGE
    return now - max(wall_now - when, 0.0)


def from_docker(action: str, exit_code: Optional[int], at: float):
    """The observation for one of Docker's container events (die, start, destroy)."""
    if action == "die":
        return Died(at, exit_code)
    return Started(at) if action == "start" else Missing(at)
