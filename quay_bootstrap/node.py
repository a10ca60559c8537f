"""This node's Quay: what runs (the live container, its stack and image), and the acts on it the
loop hands over: adopting what a pass or a roll put in place, a watchdog restart within the
cluster's budget, a roll run beside the watch, and its outcome."""
from __future__ import annotations

import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import structlog

from quay_bootstrap import canary, watchdog
from quay_bootstrap.container import IMAGE_DIGEST
from quay_bootstrap.errors import Interrupted
from quay_bootstrap.pipeline import Live

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class RollOutcome:
    """What a roll in the background brings back to the loop."""

    why: str
    one: Any = None  # the pipeline Pass it ran
    rolled: Any = None  # rollout.Rolled, or None when it failed
    error: Optional[BaseException] = None
    touched: bool = False  # it stopped or replaced Quay's container


class Node:
    """Args: the roll (rollout.Roll); the status board; systemd; `feed`, the loop's way to tell
    the watchdog; `wake`, to probe at once; a clock; `spawn(fn)` runs a roll beside the loop
    (a thread; tests run it in place); `deliver` puts its outcome on the loop's queue; `drain`
    (drain.Drain) takes the node out of the load balancer before a planned stop."""

    def __init__(self, roll, board, systemd, feed: Callable, wake: Callable[[], None],
                 clock: Callable[[], float], spawn: Callable, deliver: Callable,
                 drain=None) -> None:
        from quay_bootstrap.drain import Drain

        self.roll, self.board, self.systemd, self.feed, self.wake = roll, board, systemd, feed, wake
        self.clock, self.spawn, self.deliver = clock, spawn, deliver
        self.balancer = drain or Drain(board, roll.sleep)
        self.live: Optional[Live] = None
        self.docker = self.store = self.held = None
        self.replacing = threading.Event()  # a roll stops or replaces Quay: the watch waits
        self.stopping = threading.Event()  # the agent stops or the instance drains
        self.rolling = False
        self._lock = threading.Lock()  # one act on the container at a time
        self._lease = None  # budget.Lease: a restart's, or a held node's, until it is healthy
        self.canary = None  # a first start's canary, judged by the watch (first_verdict)
        roll.on_step = self._show_roll
        roll.on_endtoend = self._show_endtoend

    # --- what runs ----------------------------------------------------------------------------
    def first_pass(self, one) -> bool:
        """The first pass (rollout.Roll.first); True when a change waits for a roll."""
        live, deferred, rolled = self.roll.first(one)
        self.docker, self.store = one.docker, one.store
        self.adopt(live, started_at=self.clock() - self.docker.age(live.container_id))
        self.apply(rolled)
        return deferred

    def adopt(self, live: Live, started_at: float) -> None:
        self.live = live
        self.board.update(degraded=_degraded(live.spec))
        now = self.clock()
        self.feed(watchdog.Applied(now, started_at, quiet_until=now))
        self.board.update(state="starting", stack_version=live.stack_version,
                          image_digest=live.spec.labels[IMAGE_DIGEST],
                          container=live.cfg.container.name, container_id=live.container_id)
        self.wake()

    def apply(self, rolled) -> None:
        if rolled.behind and not self.board.snapshot().get("degraded"):
            self.docker.leave_restarts_to_the_agent(self.live.container_id)
        self.held = rolled.report(self.board, self.held)
        self.canary = rolled.canary or self.canary
        if rolled.lease is not None:  # held: out of service, the slot stays taken until healthy
            if self._lease is None:
                self._lease = rolled.lease
            else:
                rolled.lease.release()
        self._show_leases()

    def first_verdict(self, phase: str) -> None:
        """A first start that was the canary: healthy says so to the cluster. Failing says
        nothing about the version (this node may be at fault): the next node to start it goes
        first, and if the migration ran, the database record says which image ran it."""
        if self.canary is None or phase not in ("healthy", "failing"):
            return
        (verdicts, image, tag), self.canary = self.canary, None
        try:
            verdicts.finish(image, tag, canary.HEALTHY if phase == "healthy" else canary.OPEN)
            if phase == "healthy":
                return
            log.warning("rollout.canary_inconclusive", image=image,
                        note="the next node to start this version goes first")
        except Exception as err:  # noqa: BLE001 - the record stays rolling until its ttl
            log.warning("rollout.canary_record_failed", error=str(err))

    # --- the watchdog's restart -----------------------------------------------------------------
    def restart(self, action: watchdog.Restart, state: watchdog.State) -> None:
        """A Quay that exited or is gone comes back at once; one that runs but fails takes a
        slot of the cluster's budget first (held until it is healthy again), so a cause every
        node sees never restarts them all at once."""
        self.first_verdict("failing")
        with self._lock:
            try:
                if self.replacing.is_set() or (not (action.exited or action.recreate) and
                                               not self._take_slot(action)):
                    self.feed(watchdog.RestartDeferred(
                        self.clock(), "a roll is replacing Quay" if self.replacing.is_set() else
                        "waiting for the cluster's budget: rollout.max_unavailable nodes are "
                        "out of service already"))
                    return
                self.board.m_restarts.inc()
                log.warning("container.restarting", reason=action.reason,
                            next_backoff=state.backoff, restarts_in_window=len(state.restarts),
                            services=state.services())
                spec = self.roll.restart_spec(self.live)

                def expect(echoes) -> None:
                    self.feed(watchdog.Expect(self.clock(), self.clock() + spec.stop_timeout + 10,
                                              echoes))

                with self.systemd.keepalive():
                    try:
                        if not (action.exited or action.recreate):  # it runs: planned, drained
                            self.balancer.leave(self.live.cfg, f"restart: {action.reason}")
                        created = self.docker.restart_quay(
                            spec, action.recreate or spec != self.live.spec or self._drifted(spec),
                            action.exited, expect)
                    finally:
                        self.balancer.back()
                if created:
                    self.live = replace(self.live, spec=spec, container_id=created)
                    self.board.update(degraded=_degraded(spec))
                self.wake()
            except Exception as err:  # noqa: BLE001 - the loop must survive; retried when due
                self.feed(watchdog.RestartFailed(self.clock(), str(err), action))

    def _drifted(self, spec) -> bool:
        """Whether the dead container under Quay's name is not the one this node runs (a roll
        that failed after replacing it left its own): a restart then recreates what runs,
        never starts a stranger's spec again (found by the model)."""
        from quay_bootstrap.container import IMAGE_DIGEST, SPEC_HASH, STACK_VERSION

        found = self.docker.find(spec.name)
        return found is not None and found.status != "running" and any(
            found.labels.get(label) != spec.labels.get(label)
            for label in (STACK_VERSION, IMAGE_DIGEST, SPEC_HASH))

    def _take_slot(self, action) -> bool:
        from quay_bootstrap.budget import Lease

        if self._lease is None:
            self._lease = Lease.try_take(self.roll.budget(self.live.cfg, "restart"),
                                         f"restart: {action.reason}", self.roll.held)
            self._show_leases()
        return self._lease is not None

    def drain(self, stop_quay: Callable[[], None], lifecycle) -> None:
        """The instance is leaving: no roll starts a replacement any more, one in progress
        finishes first (the lock), then Quay stops and the group hears CONTINUE."""
        self.stopping.set()
        cfg = self.live.cfg

        def drained_stop() -> None:
            self.balancer.leave(cfg, "terminating")
            stop_quay()

        with self._lock:
            lifecycle.drain(drained_stop)

    def healthy(self, probed: bool = True) -> None:
        """Quay answers again: a restart's slot goes back to the cluster, and (on a probe's
        word) an instance put in Standby for a planned stop goes back InService."""
        if probed:
            self.balancer.healthy()
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.release()
            self._show_leases()

    def _show_roll(self, state, target, todo: str = "") -> None:
        """/status `roll`: the step a roll is at, and `not_applied`: why the source's stack and
        image are not what this node runs (rejected, backing off, stopped by the canary)."""
        from quay_bootstrap import roll_states

        where = {} if target is None else {"version": target.version, "image": target.image,
                                           "entry_point": target.entry}
        if not roll_states.terminal(state):
            step = "waiting for another node's canary" if todo in (
                roll_states.WAIT_FOR_VERDICT, roll_states.RELEASE_AND_WAIT) else \
                _STEPS.get(type(state).__name__, "planning")
            self.board.update(roll={"step": step, **where})
            self._roll_metric(step)
            return
        result = getattr(state, "result", "held")
        waiting = result in _NOT_APPLIED
        self.board.update(roll=None, not_applied={
            "why": result, "blame": getattr(state, "blame", None), **where} if waiting else None)
        self._roll_metric(result if waiting else "none")

    def _roll_metric(self, current: str) -> None:
        """quay_bootstrap_roll{state}: 1 for `current` only ("none": converged)."""
        for state in (*_STEPS.values(), "waiting for another node's canary", *_NOT_APPLIED,
                      "none"):
            self.board.m_roll.labels(state).set(1 if state == current else 0)

    def _show_endtoend(self, answer) -> None:
        """/status `endtoend` and quay_bootstrap_endtoend_up: Quay's last answer on the shared
        services, read before a new image rolls."""
        import time

        self.board.update(endtoend={"ok": answer.ok, "status": answer.status,
                                    "error": answer.error, "services": dict(answer.services),
                                    "at": time.time()})
        self.board.m_endtoend.set(1 if answer.ok else 0)

    def _show_leases(self) -> None:
        """The slots of the cluster's budget this node holds, in /status."""
        self.board.update(leases=sorted(self.roll.held.values(), key=lambda lease: lease["slot"]))

    # --- rolls --------------------------------------------------------------------------------
    def start_roll(self, one_for: Callable, cfg, why: str) -> None:
        """A roll beside the loop: while it waits for a lease or a canary, the watch goes on."""
        if self.rolling:
            log.debug("rollout.busy", why=why, note="tried again at the next refresh")
            return
        self.rolling = True
        self.spawn(lambda: self.deliver(self._roll(one_for, cfg, why)))

    def _roll(self, one_for: Callable, cfg, why: str) -> RollOutcome:
        touched = []

        def touching() -> None:
            self._lock.acquire()  # no watchdog restart from here on
            touched.append(1)
            if self.stopping.is_set():  # SIGTERM or a drain: never start a replacement now
                raise Interrupted()
            self.replacing.set()
            self.balancer.leave(one.cfg, f"{why}: roll")  # out of the load balancer first

        one = None
        try:  # no systemd keepalive here: the loop goes on pinging, and a wedged loop shows
            one = one_for(cfg)
            # A slot the node keeps (held, rolled back to a Quay not healthy yet, a restart's
            # until healthy) is the roll's too: taking a second one and giving it back at the
            # roll's end would free the slot the node still needs (found in review).
            rolled = self.roll.apply(one, self.live, why, touching, held=self._lease)
            return RollOutcome(why, one, rolled, touched=bool(touched))
        except Exception as err:  # noqa: BLE001 - Interrupted too: the loop decides
            return RollOutcome(why, one, error=err, touched=bool(touched))
        finally:
            if touched:
                self._lock.release()

    def finish_roll(self, outcome: RollOutcome) -> None:
        """On the loop's thread: the roll's outcome becomes what the node runs."""
        self.rolling = False
        if outcome.touched:  # a replacement's die, destroy and start were the roll's own
            now = self.clock()
            self.feed(watchdog.Expect(now, now, everything=True))
        self.replacing.clear()
        if outcome.touched:  # whatever runs now has not been probed: /ready 503 until it is
            self.board.update(state="starting", ready_carried_until=None)
        self.balancer.back()  # /ready follows the watch again: 200 once the new Quay is healthy
        if isinstance(outcome.error, Interrupted):
            return
        if outcome.error is not None and outcome.touched:
            found = self.docker.find(self.live.spec.name)  # its events were the roll's: look
            if found is None or found.status != "running":
                self.feed(watchdog.Missing(self.clock()) if found is None
                          else watchdog.Died(self.clock()))
        if outcome.error is not None:
            log.error("rollout.failed", why=outcome.why, error=str(outcome.error),
                      note="still watching the Quay that runs")
            self.board.update(roll=None, last_change={"why": outcome.why, "result": "failed",
                                                      "error": str(outcome.error)})
            return
        rolled = outcome.rolled
        if outcome.touched:
            self.canary = None  # a first start's verdict is for a container that is gone
        if rolled.live is not None:
            self.store = outcome.one.store
            self.adopt(rolled.live, started_at=self.clock())
        elif rolled.cfg is not None:
            self.live = replace(self.live, cfg=rolled.cfg)
        self.apply(rolled)


# The ends of a roll that leave the source's change not applied here (/status not_applied).
_NOT_APPLIED = ("rejected", "backing off", "stopped", "rolled back",
                "waiting: shared services down")

# What /status says a roll is doing, by roll_states' state.
_STEPS = {"Planning": "planning", "Gating": "reading the canary record",
          "Leasing": "waiting for a lease", "Confirming": "reading the source again",
          "Claiming": "claiming the canary", "Replacing": "replacing Quay",
          "Verifying": "waiting for Quay to be healthy", "RollingBack": "rolling back"}


def _degraded(spec) -> Optional[str]:
    if not spec.command:
        return None
    return ("the shared database was migrated by a newer Quay: this node runs its older one "
            "without migrating (registry-nomigrate) until it is rolled forward")
