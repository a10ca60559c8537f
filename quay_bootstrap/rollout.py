"""Rolling a change onto this node: fetched and pulled first, the canary gate for a new image,
a lease of the disruption budget (budget.py), stop + start, then healthy or back (or held, when
the database was already migrated)."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import structlog

from quay_bootstrap import canary as canary_mod
from quay_bootstrap import health
from quay_bootstrap import roll_states as states
from quay_bootstrap.budget import Budget, Lease
from quay_bootstrap.canary import Verdicts
from quay_bootstrap.container import (
    IMAGE_DIGEST,
    IMAGE_TAG,
    MANAGED,
    with_entry_point,
)
from quay_bootstrap.pipeline import Live
from quay_bootstrap.rolled import Rolled, Run, canary_failed

if TYPE_CHECKING:
    from quay_bootstrap.pipeline import Pass
    from quay_bootstrap.stores import LeaseStore

log = structlog.get_logger(__name__)
# How long a failed canary's current run may take to end before its logs are read: longer, and
# it may be migrating, so it counts as migrated (canary.migrated_in).
VERDICT_WAIT = 30.0


class Roll:
    """Applies a changed stack, image or spec to this node within the cluster's budget:
    everything fetched, validated and pulled first, then (for a new image) the canary gate,
    then a lease, stop + start, and healthy within start_period or back to the previous stack
    and image. A version that rolled back is not tried again until the source changes.

    Args:
        open_leases: the lease store for a `stack` config (stores.open_leases).
        me: this node's name in leases and the canary record.
        sleep: the daemon's stop-aware sleep: SIGTERM ends every wait.
        clock: wall-clock seconds (leases and the canary record are compared across nodes).
    """

    def __init__(self, open_leases: Callable, me: str, sleep: Callable[[float], None],
                 clock: Callable[[], float] = time.time, poll: float = 2.0) -> None:
        self.open_leases = open_leases
        self.me = me
        self.sleep = sleep
        self.clock = clock
        self.poll = poll
        self._leases: Dict[tuple, LeaseStore] = {}
        self._failures: Dict[tuple, Tuple[int, float]] = {}  # key -> (failures, retry at)
        self.held: Dict[str, dict] = {}  # the leases this node holds, for /status
        # Told each state the roll enters, its target and what it does next (node.Node shows
        # it in /status).
        self.on_step: Callable[..., None] = lambda state, target, todo: None
        # Told each /health/endtoend answer read before a new image rolls (shown in /status).
        self.on_endtoend: Callable[..., None] = lambda probe: None

    def apply(self, one: Pass, live: Live, why: str,
              touching: Callable[[], None] = lambda: None,
              held: Optional[Lease] = None) -> Rolled:
        """The shell around roll_states: does what the machine asks, one step at a time, and
        hands it what happened. Every wait (a verdict, a lease) is followed by fresh facts.

        Args: the pass for the new config; what the node runs; why (for the log);
        `touching` is called just before Quay's container is first stopped or replaced; `held`:
        the lease a held node keeps, which this roll uses and never gives back (the node does,
        once healthy): a held node is out of service whatever the roll's end."""
        cfg = one.cfg
        verdicts = self.verdicts(cfg.stack)
        run = Run(one, live, why)
        state, todo = states.start()
        lease: Optional[Lease] = None
        try:
            while not states.terminal(state):
                if todo == states.RELEASE_AND_GATHER:
                    log.info("rollout.replanned", why=why, note="the source, the database or "
                             "the canary changed while this node waited: planned again")
                if todo in (states.RELEASE_AND_GATHER, states.RELEASE_AND_WAIT):
                    if lease is not held:
                        lease.release()
                    lease = None
                if todo in (states.WAIT_FOR_VERDICT, states.RELEASE_AND_WAIT):
                    if not run.waited:
                        log.info("rollout.waiting_for_canary", image=run.target.image,
                                 canary=verdicts.waiting_for)
                        run.waited = True
                    self.sleep(self.poll)
                if todo in (states.GATHER, states.RELEASE_AND_GATHER, states.WAIT_FOR_VERDICT,
                            states.RELEASE_AND_WAIT):
                    event = states.Gathered(self._facts(run, verdicts))
                elif todo in (states.PEEK, states.CLAIM):
                    event = states.Verdict(verdicts.ask(run.target.image, run.target.tag,
                                                        cfg.rollout.lease_ttl,
                                                        claim=todo == states.CLAIM))
                elif todo == states.ACQUIRE:
                    lease = held or Lease.take(self.budget(cfg), f"{why}: {run.reason}", self.sleep,
                                       self.poll, self.held)
                    event = states.LeaseTaken()
                elif todo == states.REPLACE:
                    log.info("rollout.replacing", why=why, reason=run.reason,
                             canary=state.canary, version=run.target.version,
                             image=run.target.image)
                    touching()
                    if not run.spec.command:
                        verdicts.migrating(run.target.image, run.target.tag)
                    # Decided again: while this roll waited, the watchdog may have recreated it.
                    _, run.container_id = one.reconcile(one.docker, run.spec)
                    event = states.Started()
                elif todo == states.WAIT_HEALTHY:
                    run.probe = probe = one.wait_healthy(run.container_id)
                    failing = frozenset(k for k, v in (probe.services or {}).items() if not v)
                    superseded = not probe.ok and self.entry(run.spec, verdicts) != run.spec
                    event = states.Health(probe.ok, probe.error or "", failing,
                                          not probe.ok and state.canary and not superseded and
                                          self._migrated(one, run.spec, run.container_id),
                                          superseded)
                elif todo == states.ROLL_BACK:
                    log.error("rollout.rolling_back", why=why, version=run.target.version,
                              image=run.target.image, error=state.error,
                              services=run.probe.services)
                    one.store.switch_current(live.stack_version)
                    run.back_spec = self.entry(live.spec, verdicts)
                    _, run.container_id = one.reconcile(one.docker, run.back_spec)
                    run.back_ok = one.wait_healthy(run.container_id).ok
                    event = states.RolledBack(run.back_ok)
                else:
                    raise states.BadTransition(f"nothing does {todo!r}")
                state, todo = states.step(state, event, frozenset(cfg.health.shared_services))
                self.on_step(state, run.target, todo)
            rolled = self._finish(state, run, verdicts, None if lease is held else lease)
            if rolled.lease is not None:
                lease = None  # out of service still: the node keeps the slot until healthy
            return rolled
        finally:
            if lease is not None and lease is not held:
                lease.release()

    def _facts(self, run: "Run", verdicts: Verdicts) -> states.Facts:
        """Fresh facts: the stack fetched and the lock read again, the entry point from the
        database record now, what reconciling would do now."""
        one = run.one
        base = one.prepare()  # fetched, validated, pulled: Quay is untouched so far
        run.spec = spec = self.entry(base, verdicts)
        found, action = one.decide(spec)
        run.reason, run.action = action.reason, action.kind
        run.target = target = states.target_of(spec)
        failures, until = self._failures.get(target.key, (0, 0.0))
        shared_down = False
        if action.kind == "replace" and one.cfg.rollout.wait_for_shared_services and \
                target.image != states.target_of(run.live.spec).image:
            answer = one.endtoend()  # a new image migrates: only while the shared services answer
            self.on_endtoend(answer)
            shared_down = health.shared_down(answer)
        return states.Facts(
            target, states.target_of(run.live.spec), action.kind,
            only_entry_point=spec is not base and action.kind == "replace" and
            one.decide(base)[1].kind == "adopt",
            rejected=action.kind == "replace" and one.store.is_rejected(*target.key),
            backoff_until=until, now=self.clock(), failures=failures, shared_down=shared_down)

    def _finish(self, state, run: "Run", verdicts: Verdicts, lease: Optional[Lease]) -> Rolled:
        """What the machine's end means for the node, the stack folder and the records."""
        one, live, why, target = run.one, run.live, run.why, run.target
        cfg = one.cfg
        if isinstance(state, states.Held):
            one.store.reject(*target.key)
            verdicts.finish(target.image, target.tag, canary_mod.FAILED_AFTER)
            new = Live(cfg, run.spec, target.version, run.container_id, one.health_url)
            return replace(self._hold(new, why, run.probe), lease=lease)
        result = state.result
        if result == "unchanged":
            log.debug("rollout.unchanged", why=why)
            return Rolled("unchanged", cfg=cfg, behind=state.behind)
        if result == "skipped":  # missing, stopped or not ours: the watchdog's business
            log.info("rollout.skipped", why=why, action=run.action, reason=run.reason)
            return Rolled("skipped")
        if result == states.WAITING_SHARED:
            one.store.switch_current(live.stack_version)
            log.info("rollout.waiting_for_shared_services", why=why, image=target.image,
                     note="Quay's /health/endtoend says a shared service is down: a new image "
                          "(a migration) waits; tried again at the next refresh")
            return Rolled(result, cfg=cfg)
        if result in ("rejected", "backing off"):
            one.store.switch_current(live.stack_version)
            log.debug("rollout.still_rejected" if result == "rejected" else "rollout.backing_off",
                      why=why, version=target.version[:12], image=target.image)
            return Rolled(result, cfg=cfg)  # a SIGHUP's config is kept: the next refresh
            # reads the source it names (the lock that fixes this, say)
        if result == "stopped":
            one.store.reject(*target.key)
            one.store.switch_current(live.stack_version)
            return Rolled("stopped", cfg=cfg)
        if result == "superseded":
            log.warning("rollout.superseded", why=why, version=target.version, image=target.image,
                        error=state.error, note="another node migrated the database past this "
                        "image while it started; the watch restarts it without migrating and "
                        "the next refresh rolls to what the source says")
            new = Live(cfg, run.spec, target.version, run.container_id, one.health_url)
            return Rolled("applied", new, cfg, {"why": why, "result": "superseded",
                                                "version": target.version,
                                                "image": target.image, "error": state.error})
        if state.verdict:
            verdicts.finish(target.image, target.tag, state.verdict)
        if result == "applied":
            self._failures.pop(target.key, None)
            new = Live(cfg, run.spec, target.version, run.container_id, one.health_url)
            fields = {"why": why, "version": target.version, "image": target.image}
            if state.pending:
                log.warning("rollout.canary_unjudged", image=target.image, error=state.error,
                            note="only shared services failed: the verdict waits for them")
            else:
                one.store.mark_known_good(target.version)
            return Rolled("applied", new, cfg, {**fields, "result": "applied"},
                          ("info", "rollout.applied", fields),
                          canary=(verdicts, target.image, target.tag) if state.pending else None)
        # rolled back
        if state.reject:
            one.store.reject(*state.reject)
            note = "not retried until the source changes again"
        else:
            failures = self._failures.get(target.key, (0, 0.0))[0] + 1
            wait = states.backoff(failures)
            self._failures[target.key] = (failures, self.clock() + wait)
            note = f"no evidence against the change ({state.blame}): tried again in {wait:g}s"
        if not run.back_ok:
            note += "; the previous Quay is not healthy either: this node keeps its slot of " \
                    "the budget until it is, so the next node does not start"
        return Rolled("rolled back", replace(live, spec=run.back_spec,
                                             container_id=run.container_id), live.cfg,
                      {"why": why, "result": "rolled back", "rejected_version": target.version,
                       "rejected_image": target.image, "error": state.error,
                       "blame": state.blame, "healthy": run.back_ok},
                      ("warning", "rollout.rolled_back",
                       {"version": live.stack_version, "healthy": run.back_ok,
                        "rejected": target.version, "blame": state.blame, "note": note}),
                      lease=None if run.back_ok else lease)

    def first(self, one: Pass) -> Tuple[Live, bool, Rolled]:
        """The daemon's first pass after the agent (re)starts. A running Quay that drifted (a
        change came while the agent was down, or the agent itself was upgraded) is adopted as
        it is, and True says the change is left to a roll through the budget and the canary:
        an agent upgrade across the fleet must not replace every node's Quay at once. A node
        without a running Quay (a new cluster, a scale-out) starts at once, but a version the
        shared database has not seen goes through the canary gate first: one node migrates,
        the others wait for its verdict. Returns (live, deferred, the canary's outcome)."""
        cfg = one.cfg
        verdicts = self.verdicts(cfg.stack)
        waited = False
        while True:  # after a wait for another node's canary, decided again from fresh facts
            spec = self.entry(one.prepare(), verdicts)
            found, action = one.decide(spec)
            if action.kind == "replace" and found.status in ("running", "restarting") and \
                    found.labels.get(MANAGED) == "true":
                log.info("rollout.deferred", reason=action.reason,
                         note="Quay keeps running; the change goes through the cluster's budget")
                return one.adopt_running(found), True, Rolled("deferred")
            image, tag = spec.labels[IMAGE_DIGEST], spec.labels.get(IMAGE_TAG, "")
            canary = "canary" if action.kind == "adopt" and verdicts.claimed(image) else None
            if action.kind in ("create", "replace"):  # "go" at once where it is known good
                canary = verdicts.ask(image, tag, cfg.rollout.lease_ttl)
                if canary == "stop":
                    raise canary_failed(cfg, image)
                if canary == "wait":
                    if not waited:
                        log.info("rollout.waiting_for_canary", image=image,
                                 canary=verdicts.waiting_for)
                        waited = True
                    self.sleep(self.poll)
                    continue
            break
        if action.kind in ("create", "replace") and not spec.command:
            verdicts.migrating(image, tag)
        _, container_id = one.reconcile(one.docker, spec, (found, action))
        one.outcome.container_id = container_id
        # The watchdog gives the verdict (node.Node.first_verdict): the first start is not
        # held up waiting for health, so lifecycle heartbeats and the watch begin at once.
        return one.live(), False, Rolled(
            "started", canary=(verdicts, image, tag) if canary == "canary" else None)

    def _migrated(self, one: Pass, spec, container_id: str) -> bool:
        """Whether a failed start may have migrated the database (canary.migrated_in). Docker
        is told not to start it again, and a run it had already started again after an exit is
        given VERDICT_WAIT to end (a failing validation ends within seconds), so its logs are
        whole. One still on its first run is judged at once (running: in doubt, migrated)."""
        if spec.command:
            return False  # registry-nomigrate
        one.docker.leave_restarts_to_the_agent(container_id)
        if one.docker.restart_count(container_id):  # a run after an exit: let it end
            deadline = self.clock() + VERDICT_WAIT
            while one.docker.running(container_id) and self.clock() < deadline:
                self.sleep(min(self.poll, 1.0))
        return canary_mod.migrated_in(one.docker.logs(container_id),
                                      exited=not one.docker.running(container_id))

    def once(self, one: Pass):
        """`run --once` (run_once.run_once): one pass, as every start by the daemon."""
        from quay_bootstrap.run_once import run_once

        return run_once(self, one)

    def _hold(self, new: Live, why: str, probe) -> Rolled:
        """The canary failed after its migration: the old image cannot start against the
        migrated database, so the node is held out of service as it is, for `docker logs`."""
        reason = (f"the canary of {new.spec.labels[IMAGE_DIGEST]} failed after migrating the "
                  f"database ({probe.error}); the old image cannot start against it, so this "
                  f"node is held out of service and the rollout stopped on every node. Read "
                  f"`docker logs {new.spec.name}`, then fix the image or the stack and change "
                  "the lock again (the other nodes keep serving)")
        return Rolled("held", new, new.cfg,
                      {"why": why, "result": "held", "image": new.spec.labels[IMAGE_DIGEST],
                       "error": probe.error, "reason": reason},
                      ("error", "rollout.held", {"why": why, "reason": reason}))

    def restart_spec(self, live: Live):
        """The spec a restart recreates Quay from: with `registry-nomigrate` once another node
        migrated the shared database past this node's image (it would fail at the migration
        and leave the node with no Quay); the node then reports itself degraded. With the record
        out of reach it also starts without migrating: a Quay that ran here before needs no
        migration, and another node may have migrated past it meanwhile (found by the model)."""
        try:
            spec = self.entry(live.spec, self.verdicts(live.cfg.stack))
        except Exception as err:  # noqa: BLE001 - the store is away: the safe entry point
            log.warning("rollout.database_record_unknown", error=str(err),
                        entry_point=canary_mod.NOMIGRATE)
            return with_entry_point(live.spec, canary_mod.NOMIGRATE)
        if spec.command:
            log.warning("container.degraded", entry_point=spec.command[0],
                        why="the shared database was migrated by a newer Quay than this node "
                            "runs: it starts without migrating until it is rolled forward")
        return spec

    def budget(self, cfg, act: str = "roll") -> Budget:
        """The cluster's disruption budget: rollout.max_unavailable leases beside the stack.
        Each act of a node (a roll, a restart) holds its own, so one never gives back the
        other's slot."""
        return Budget(self._leases_for(cfg.stack), f"{self.me}/{act}",
                      cfg.rollout.max_unavailable, cfg.rollout.lease_ttl, self.clock)

    def verdicts(self, stack) -> Verdicts:
        """The canary and database records beside this stack's leases."""
        return Verdicts(self._leases_for(stack), self.me, self.sleep, self.clock, self.poll)

    @staticmethod
    def entry(spec, verdicts: Verdicts):
        """`spec` with the entry point the shared database allows (canary.entry_point)."""
        return with_entry_point(spec, canary_mod.entry_point(
            spec.labels[IMAGE_DIGEST], spec.labels.get(IMAGE_TAG, ""), verdicts.migrated()))

    def leases_for(self, stack) -> LeaseStore:
        """The lease store beside `stack.source` (opened once per store; the node's status
        record is written there too)."""
        return self._leases_for(stack)

    def _leases_for(self, stack) -> LeaseStore:
        where = (stack.source, stack.endpoint_url, stack.region, stack.ca_bundle)
        if where not in self._leases:
            self._leases[where] = self.open_leases(stack)
        return self._leases[where]
