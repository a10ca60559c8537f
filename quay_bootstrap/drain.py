"""Leaving the load balancer before a planned stop of Quay, and the answer the balancer checks.

The balancer checks the agent's `/ready`: 200 only while this node's Quay answers healthy and
nothing planned is about to stop it. Before the agent stops Quay on purpose (a roll, an upgrade,
a restart it chose, a termination) it answers 503 `draining` for the drain period: the
balancer's checks see it within check_interval x fall, new connections go to the other nodes,
and the requests in flight get `in_flight` seconds to finish. Then Quay is stopped, and /ready
says 200 again only once the new Quay answers healthy. A crash is not planned: nothing drains.

`/healthz` stays what an Auto Scaling group or a managed instance group autoheals on (503 only
once the node is marked unhealthy): a draining or starting node must not be replaced.

Pure: `drain_period`, `ready`, `remaining`, `out_since`, `carried`. The shell: `Drain`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Dict, Optional, Tuple

import structlog

log = structlog.get_logger(__name__)
# How long EnterStandby may take: the instance stays EnteringStandby until its target groups'
# deregistration delay has passed (300 s by default on AWS).
STANDBY_WAIT = 330.0
# At the agent's stop, how long ExitStandby may take before the agent exits anyway.
STANDBY_EXIT_ON_STOP = 20.0


def drain_period(cfg) -> float:
    """Seconds between /ready turning 503 and Quay being stopped: `rollout.drain_period`, else
    from the balancer's check (check_interval x (fall + 1): `fall` checks, plus one interval
    for where the first falls and its timeout) plus `in_flight`; 0 with no balancer stated or
    `rollout.drain` off."""
    if not cfg.rollout.drain:
        return 0.0
    if cfg.rollout.drain_period is not None:
        return float(cfg.rollout.drain_period)
    balancer = cfg.balancer
    if balancer is None:
        return 0.0
    return balancer.check_interval * (balancer.fall + 1) + balancer.in_flight


def ready(status: Dict[str, Any], now: float) -> Tuple[int, str]:
    """The /ready answer (HTTP status, the node's state in a word) from the status board."""
    if status.get("draining"):
        return 503, "draining"
    if status.get("marked_unhealthy"):
        return 503, "unhealthy"
    state = status.get("state") or "starting"
    if state == "healthy":
        return 200, "ready"
    until = status.get("ready_carried_until")
    if state == "starting" and until is not None and now < until:
        return 200, "ready"  # the previous agent's verdict, until this one's first probe
    return 503, state


def out_since(status: Dict[str, Any], now: float) -> Optional[float]:
    """Since when /ready has answered 503 (None: it answers 200). A carried verdict kept it
    at 200 until it ran out."""
    if ready(status, now)[0] == 200:
        return None
    since = status.get("since")
    carried_until = status.get("ready_carried_until")
    if since is not None and carried_until is not None:
        return max(since, carried_until)
    return since


def remaining(period: float, now: float, since: Optional[float]) -> float:
    """How much of the drain period is left to wait: a node whose /ready has answered 503 since
    SINCE (a failing Quay, a shared outage) left the balancer that long ago already."""
    if since is None:
        return period
    return max(0.0, period - max(0.0, now - since))


def carried(previous: Dict[str, Any], now: float, limit: float) -> Optional[float]:
    """Until when a restarted agent may answer /ready as its previous run last did: only a
    healthy verdict at most LIMIT seconds old, not draining, not marked. An agent restart
    (an upgrade reaching every node at once) must not take every node out of the balancer
    while it finds out again what it knew a moment ago. None: start at 503 `starting`."""
    probe = previous.get("last_probe") or {}
    at = probe.get("at")
    if previous.get("state") != "healthy" or previous.get("draining") or \
            previous.get("marked_unhealthy") or not probe.get("ok") or \
            not isinstance(at, (int, float)) or not 0 <= now - at <= limit:
        return None
    return now + limit


class Drain:
    """Takes this node out of the load balancer before a planned stop of Quay.

    Args: the status board (/ready reads `draining` from it); the stop-aware sleep (SIGTERM
    ends a drain); a wall clock; `standby(cfg)` makes an aws.Standby (tests pass their own).
    """

    def __init__(self, board, sleep: Callable[[float], None],
                 clock: Callable[[], float] = time.time,
                 standby: Optional[Callable[[Any], Any]] = None) -> None:
        self.board, self.sleep, self.clock = board, sleep, clock
        self._make_standby = standby or _aws_standby
        self._standby = None  # an aws.Standby the node is in, until Quay is healthy again

    def leave(self, cfg, why: str) -> None:
        """/ready answers 503 `draining` (and the instance enters Standby when configured),
        then the rest of the drain period passes. Returns when Quay may be stopped."""
        period = drain_period(cfg)
        now = self.clock()
        wait = remaining(period, now, out_since(self.board.snapshot(), now))
        self.board.update(draining={"why": why, "since": now, "until": now + wait},
                          ready_carried_until=None)
        if cfg.rollout.standby and self._standby is None:
            # Kept even when entering failed or timed out: EnterStandby may have been sent, and
            # exit() undoes only what was done. Its waits end on SIGTERM (the stop-aware sleep).
            self._standby = self._make_standby(cfg, self.sleep)
            self._standby.enter(why, timeout=STANDBY_WAIT)
            # EnteringStandby lasted the target groups' deregistration delay: that counts.
            wait = max(0.0, wait - (self.clock() - now))
        if wait > 0:
            log.info("drain.leaving", why=why, seconds=round(wait, 1),
                     note="/ready answers 503 draining: the load balancer sends new requests "
                          "to the other nodes and those in flight finish before Quay stops")
            self.sleep(wait)

    def back(self) -> None:
        """The planned stop is over (Quay replaced, restarted, or left as it was): /ready follows
        Quay's health again, so 200 only once it answers healthy."""
        if self.board.snapshot().get("draining"):
            self.board.update(draining=None)

    def healthy(self) -> None:
        """Quay answers healthy again: back InService, off the loop's thread."""
        standby, self._standby = self._standby, None
        if standby is not None:
            threading.Thread(target=standby.exit, name="standby-exit", daemon=True).start()

    def close(self) -> None:
        """The agent stops: an instance it put in Standby goes back (Quay keeps running), with
        a plain sleep (the stop-aware one ends at once now) and a short bound."""
        standby, self._standby = self._standby, None
        if standby is not None:
            standby.sleep = time.sleep
            standby.exit(timeout=STANDBY_EXIT_ON_STOP)


def _aws_standby(cfg, sleep):
    from quay_bootstrap.aws import Standby

    return Standby(cfg.stack.region, sleep=sleep)
