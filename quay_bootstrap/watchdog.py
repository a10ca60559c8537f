"""The watchdog's decisions (pure): observations and a clock in, a new state and actions out.

Knowing when NOT to act is the point: failures during start-up do not count, a failure of only
the services every node shares (database, redis, storage, auth) is a cluster outage that no
restart of this node can fix, and Docker's own restart of an exited container counts like ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import FrozenSet, List, Optional, Tuple

# The observations and actions live in watchdog_events.py; every one is importable from here.
from quay_bootstrap.watchdog_events import (
    GUNICORNS,
    Applied,
    ClearUnhealthy,
    Died,
    Expect,
    Log,
    MarkKnownGood,
    MarkUnhealthy,
    Missing,
    Probed,
    Ready,
    Restart,
    RestartDeferred,
    RestartFailed,
    Started,
    Tick,
    event_at,
    from_docker,
)

__all__ = ["Policy", "State", "step", "RESET_AFTER", "REMINDER_EVERY",
           # observations
           "Probed", "Died", "Started", "Missing", "Tick", "Applied", "Expect", "RestartDeferred",
           "RestartFailed", "event_at", "from_docker",
           # actions
           "Restart", "MarkUnhealthy", "ClearUnhealthy", "Ready", "MarkKnownGood", "Log"]

# How long a node must stay healthy before the restart backoff starts again from the beginning.
RESET_AFTER = 600.0


@dataclass(frozen=True)
class Policy:
    start_period: float
    failure_threshold: int
    success_threshold: int
    backoff_initial: float
    backoff_max: float
    unhealthy_after: int
    window: float
    shared_services: FrozenSet[str]

    @classmethod
    def from_config(cls, cfg) -> "Policy":
        return cls(cfg.health.start_period, cfg.health.failure_threshold,
                   cfg.health.success_threshold, cfg.restart.backoff_initial,
                   cfg.restart.backoff_max, cfg.restart.unhealthy_after, cfg.restart.window,
                   frozenset(cfg.health.shared_services))


# --- state ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class State:
    phase: str = "starting"  # starting, healthy, failing, shared-outage
    since: float = 0.0
    started_at: float = 0.0
    failures: int = 0
    successes: int = 0
    restarts: Tuple[float, ...] = ()  # when, within `window`
    last_restart: Optional[float] = None
    backoff: float = 0.0  # wait before the next restart; 0 = at once
    pending: Optional[str] = None  # why a restart is due
    recreate: bool = False
    exited: bool = False
    marked: bool = False
    ready: bool = False
    healthy_since: Optional[float] = None
    last_reminder: float = 0.0
    last_probe: Optional[Probed] = None
    container_up: bool = True
    # Docker events the agent's own acts will cause: (kind, until), each consumed once.
    echoes: Tuple[Tuple[str, float], ...] = ()
    quiet_until: float = float("-inf")
    # The state before the last restart was counted: a restart that waits for the cluster's
    # budget is not one (RestartDeferred), and must not bring escalation nearer.
    undo: Optional["State"] = field(default=None, repr=False, compare=False)

    def services(self) -> dict:
        """Quay's per-service verdicts in the last probe."""
        return dict(self.last_probe.services) if self.last_probe else {}

    def restart_due_at(self) -> Optional[float]:
        if self.pending is None:
            return None
        return self.last_restart + self.backoff if self.last_restart is not None else 0.0


REMINDER_EVERY = 300.0


_EVENT_KINDS = {Died: "die", Started: "start", Missing: "destroy"}


def step(state: State, seen, policy: Policy) -> Tuple[State, List]:
    """Feed one observation; get the next state and what to do."""
    if isinstance(seen, Probed):
        return _probed(replace(state, last_probe=seen), seen, policy)
    if type(seen) in _EVENT_KINDS:
        state, echo = _consume_echo(state, seen)
        if echo:
            return state, []
    if isinstance(seen, Applied):
        return replace(state, started_at=seen.started_at, phase="starting", since=seen.at,
                       container_up=True, successes=0, failures=0, pending=None,
                       recreate=False, exited=False, echoes=(),
                       quiet_until=seen.quiet_until), []
    if isinstance(seen, Expect):
        if seen.everything:
            return replace(state, quiet_until=max(state.quiet_until, seen.until)), []
        return replace(state, echoes=state.echoes + tuple((k, seen.until) for k in seen.kinds)), []
    if isinstance(seen, RestartDeferred):
        base = state.undo or state
        return replace(base, pending=base.pending or seen.reason, last_restart=seen.at,
                       backoff=max(base.backoff, policy.backoff_initial), undo=None,
                       echoes=state.echoes, quiet_until=state.quiet_until), [
            Log("container.restart_deferred", "warning", (("reason", seen.reason),))]
    if isinstance(seen, RestartFailed):
        tried = seen.restart or Restart(seen.reason)
        return replace(state, pending=seen.reason, recreate=tried.recreate, exited=tried.exited,
                       container_up=not (tried.exited or tried.recreate)), [
            Log("container.restart_failed", "error", (("error", seen.reason),))]
    if isinstance(seen, Died):
        return _fail(replace(state, container_up=False, exited=True), seen.at, policy,
                     f"the container exited (code {seen.exit_code})")
    if isinstance(seen, Missing):
        return _fail(replace(state, container_up=False, recreate=True), seen.at, policy,
                     "the container is missing")
    if isinstance(seen, Started):
        return _started(state, seen.at, policy)
    return _tick(state, seen.at, policy)


def _consume_echo(state: State, seen) -> Tuple[State, bool]:
    """Whether a Docker event is the echo of the agent's own act; a real crash right after a
    restart is not one of the expected echoes and still counts."""
    if seen.at <= state.quiet_until:
        return state, True
    kind = _EVENT_KINDS[type(seen)]
    echoes = tuple((k, until) for k, until in state.echoes if until >= seen.at)
    for index, (expected, _) in enumerate(echoes):
        if expected == kind:
            return replace(state, echoes=echoes[:index] + echoes[index + 1:]), True
    return replace(state, echoes=echoes), False


def _probed(state: State, probe: Probed, policy: Policy) -> Tuple[State, List]:
    now = probe.at
    actions: List = []
    if probe.ok:
        successes = state.successes + 1
        state = replace(state, successes=successes, failures=0)
        if state.phase == "shared-outage":
            actions.append(Log("health.shared_outage_ended",
                               fields=(("seconds", now - state.since),)))
            state = replace(state, phase="starting", since=now)
        if successes >= policy.success_threshold and state.phase != "healthy":
            actions.append(Log("health.healthy", fields=(("after", state.phase),)))
            actions.append(MarkKnownGood())
            if state.marked:
                actions.append(ClearUnhealthy())
            if not state.ready:
                actions.append(Ready())
            state = replace(state, phase="healthy", since=now, healthy_since=now, marked=False,
                            ready=True, pending=None)
        if state.phase == "healthy" and state.healthy_since is not None and \
                now - state.healthy_since >= RESET_AFTER and (state.backoff or state.restarts):
            state = replace(state, backoff=0.0, restarts=())
        return state, actions

    failing = frozenset(name for name, good in probe.services if not good)
    # As Quay documents RDSAwareHealthCheck (real Quay's never does it: test_real_quay.py):
    # while RDS says the database is not `available` (a failover, a stop), the database is
    # left out of this node's verdict.
    judged = failing - {"database"} if probe.rds_unavailable else failing
    if not failing and probe.gunicorns_alive:
        # No verdict (a timeout, an error without Quay's body: JWT auth raising gives 502 on real
        # Quay) while this node's gunicorns answer Quay's own ping: a shared check is slow or
        # down (LDAP, the preferred storage, an AWS API), the same on every node.
        failing = judged = frozenset({"unanswered-while-gunicorns-alive"})
        shared = True
    elif failing and failing <= GUNICORNS and probe.gunicorns_alive:
        # Quay's own 2 s ping of a gunicorn failed, but the same ping, given the probe's
        # timeout, answered: its workers are busy, not hung (real Quay with every database
        # round trip taking 8 s, on every node at once). A restart would not make them faster.
        failing = judged = frozenset({"gunicorns-slow-but-answering"})
        shared = True
    else:
        shared = bool(failing) and judged <= policy.shared_services
    if shared:
        if state.phase != "shared-outage":
            actions.append(Log("health.shared_outage", "warning",
                               (("failing", sorted(failing)), ("rds", probe.rds_unavailable),
                                ("action", "none: every node sees this; restarting would only "
                                           "turn a blip into an outage"))))
            state = replace(state, phase="shared-outage", since=now, last_reminder=now,
                            pending=None)
        elif now - state.last_reminder >= REMINDER_EVERY:
            actions.append(Log("health.shared_outage_continues", "warning",
                               (("failing", sorted(failing)), ("seconds", now - state.since))))
            state = replace(state, last_reminder=now)
        return replace(state, failures=0, successes=0), actions

    if state.phase == "shared-outage":
        actions.append(Log("health.shared_outage_ended", fields=(("seconds", now - state.since),)))
        state = replace(state, phase="starting", since=now)
    state = replace(state, successes=0)
    if now - state.started_at < policy.start_period and state.phase != "healthy":
        return state, actions  # Quay is still starting: failures do not count yet
    failures = state.failures + 1
    state = replace(state, failures=failures)
    if failures < policy.failure_threshold:
        return state, actions
    new, more = _fail(state, now, policy, f"{failures} failed probes: {probe.error}")
    return new, actions + more


def _fail(state: State, now: float, policy: Policy, reason: str) -> Tuple[State, List]:
    actions: List = []
    if state.phase != "failing":
        actions.append(Log("health.failing", "warning", (("reason", reason),)))
        state = replace(state, phase="failing", since=now)
    if state.pending is None:
        state = replace(state, pending=reason)
    new, more = _tick(state, now, policy)
    return new, actions + more


def _tick(state: State, now: float, policy: Policy) -> Tuple[State, List]:
    due = state.restart_due_at()
    if due is None or now < due:
        return state, []
    action = Restart(state.pending or "", recreate=state.recreate, exited=state.exited)
    new, actions = _restarted(state, now, policy)
    return new, [action, *actions]


def _restarted(state: State, now: float, policy: Policy) -> Tuple[State, List]:
    """Record a restart (ours or Docker's), escalating after `unhealthy_after` in `window`."""
    restarts = tuple(t for t in state.restarts if now - t < policy.window) + (now,)
    actions: List = []
    marked = state.marked
    if len(restarts) >= policy.unhealthy_after and not marked:
        actions.append(MarkUnhealthy(f"{len(restarts)} restarts within {policy.window:g}s did "
                                     f"not help: {state.pending or 'the container exited'}"))
        marked = True
    # After escalation keep trying, at the slowest pace: a node that recovers is still useful.
    backoff = policy.backoff_max if marked else min(
        max(state.backoff * 2, policy.backoff_initial), policy.backoff_max)
    return replace(state, restarts=restarts, last_restart=now, backoff=backoff, pending=None,
                   recreate=False, exited=False, started_at=now, failures=0, successes=0,
                   marked=marked, phase="starting", since=now, container_up=True,
                   undo=replace(state, undo=None)), actions


def _started(state: State, now: float, policy: Policy) -> Tuple[State, List]:
    """A start event: the echo of our own restart, or Docker's restart policy, which counts as a
    restart so that the two never double up."""
    if state.container_up:
        return state, []
    new, actions = _restarted(state, now, policy)
    return new, [*actions, Log("container.restarted_by_docker",
                               fields=(("restarts", len(new.restarts)),))]
