"""Rolling a change across the cluster: the disruption budget (leases in the object store the
cluster already has), the canary for a new image, and the roll of one node.

At most `rollout.max_unavailable` nodes replace their Quay container at the same time. A node
takes one of that many lease objects next to the stack with a conditional create (S3
`IfNoneMatch="*"`, GCS `if_generation_match=0`, O_EXCL on a directory), holds it with an expiry,
and deletes it when done; a node that dies mid-roll blocks the others only until its lease
expires, when the next node takes it over with a conditional overwrite of exactly what it read.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import structlog

from quay_bootstrap.container import IMAGE_DIGEST, SPEC_HASH, STACK_VERSION
from quay_bootstrap.pipeline import Live

if TYPE_CHECKING:
    from quay_bootstrap.config import Config
    from quay_bootstrap.pipeline import Pass
    from quay_bootstrap.stores import LeaseStore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LeaseBody:
    holder: str
    expires: float  # epoch seconds
    reason: str = ""

    def encode(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": self.expires,
                           "reason": self.reason}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Optional["LeaseBody"]:
        try:
            raw = json.loads(data.decode())
            return cls(str(raw["holder"]), float(raw["expires"]), str(raw.get("reason", "")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None  # unreadable: treated as expired, so it cannot block the cluster


def may_take(current: Optional[LeaseBody], me: str, now: float) -> bool:
    """Pure: whether a slot whose lease reads `current` can be taken by `me` at `now`."""
    return current is None or current.holder == me or current.expires <= now


@dataclass
class Budget:
    """Args: the lease store; this node's name; how many slots; lease lifetime in seconds."""

    store: LeaseStore
    me: str
    slots: int
    ttl: float
    clock: Callable[[], float] = time.time
    _released: Dict[int, object] = field(default_factory=dict, repr=False)

    def try_acquire(self, reason: str = "") -> Optional[int]:
        """Take a free or expired slot; the slot number, or None when all are held."""
        body = LeaseBody(self.me, self.clock() + self.ttl, reason).encode()
        for slot in range(self.slots):
            key = f"lease-{slot}"
            got = self.store.get(key)
            if got is None:
                if self.store.create(key, body):
                    return slot
                continue
            current = LeaseBody.decode(got[0])
            if may_take(current, self.me, self.clock()) and self.store.replace(key, body, got[1]):
                if current and current.holder != self.me:
                    log.warning("rollout.lease_taken_over", slot=slot, from_holder=current.holder,
                                expired_seconds_ago=round(self.clock() - current.expires, 1))
                return slot
        return None

    def acquire(self, reason: str, sleep: Callable[[float], None], poll: float = 2.0) -> int:
        """Wait for a slot (sleep is the daemon's stop-aware sleep, so SIGTERM ends the wait)."""
        from quay_bootstrap.periodic import Warnings

        waited, failing = False, Warnings("rollout.lease_store_failed")
        while True:
            try:
                slot = self.try_acquire(reason)
            except Exception as err:  # noqa: BLE001 - the store blinked: ask again after `poll`
                failing.warn(err)
                slot = None
            if slot is not None:
                log.info("rollout.lease_acquired", slot=slot, holder=self.me, reason=reason)
                return slot
            if not waited:
                log.info("rollout.waiting_for_lease", slots=self.slots, holder=self.me)
                waited = True
            sleep(poll)

    def keep(self, slot: int, reason: str = "") -> None:
        """Renew the slot's lease every third of `ttl` until it is released, from a thread of
        its own, so a roll that takes longer than `ttl` (a slow start, a rollback) is never
        taken over while this node is alive; a dead node's lease still runs out."""
        import threading

        released = threading.Event()
        self._released[slot] = released

        def renew() -> None:
            while not released.wait(self.ttl / 3):
                try:
                    if not self.renew(slot, reason):
                        return
                except Exception as err:  # noqa: BLE001 - tried again in a third of ttl
                    log.warning("rollout.lease_renew_failed", slot=slot, error=str(err))

        threading.Thread(target=renew, name=f"lease-{slot}", daemon=True).start()

    def renew(self, slot: int, reason: str = "") -> bool:
        """Push the lease's expiry `ttl` ahead; False when it is no longer this node's."""
        key = f"lease-{slot}"
        got = self.store.get(key)
        current = None if got is None else LeaseBody.decode(got[0])
        body = LeaseBody(self.me, self.clock() + self.ttl, reason).encode()
        if current is None or current.holder != self.me or \
                not self.store.replace(key, body, got[1]):
            log.error("rollout.lease_lost", slot=slot, holder=self.me,
                      now_held_by=current.holder if current else None)
            return False
        log.debug("rollout.lease_renewed", slot=slot)
        return True

    def release(self, slot: int) -> None:
        """Give the slot back; a store that keeps failing leaves it to expire after `ttl`."""
        import tenacity

        if slot in self._released:
            self._released.pop(slot).set()
        key = f"lease-{slot}"
        try:
            for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(3),
                                             wait=tenacity.wait_random_exponential(max=2),
                                             reraise=True):
                with attempt:
                    got = self.store.get(key)
                    current = None if got is None else LeaseBody.decode(got[0])
                    if got is not None and (current is None or current.holder == self.me):
                        # An expired lease in place of ours, conditional on what was just read:
                        # a node that took an overrun lease over in between keeps it (a plain
                        # delete would remove its lease too, and a third node would get in).
                        self.store.replace(key, LeaseBody(self.me, 0.0, "released").encode(),
                                           got[1])
        except Exception as err:  # noqa: BLE001 - the lease expires by itself
            log.error("rollout.lease_release_failed", slot=slot, error=str(err),
                      note=f"the other nodes wait until it expires ({self.ttl:g}s)")
            return
        log.info("rollout.lease_released", slot=slot, holder=self.me)


@dataclass(frozen=True)
class Rolled:
    """What a roll did. `live` is what the node runs afterwards when the container changed
    (applied, or rolled back); `cfg` the config to watch with from now on, when it changed."""

    result: str  # unchanged, skipped, rejected, stopped, applied, rolled back
    live: Optional[Live] = None
    cfg: Optional[Config] = None
    change: Optional[Dict[str, str]] = None  # for the status board's last_change
    # Logged by the daemon once the board shows the change, so what the log says is already
    # what /status says: (level, event, fields).
    event: Optional[Tuple[str, str, Dict[str, object]]] = None

    def log(self) -> None:
        if self.event:
            level, event, fields = self.event
            getattr(log, level)(event, **fields)


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

    def apply(self, one: Pass, live: Live, why: str,
              touching: Callable[[], None] = lambda: None) -> Rolled:
        """Args: the pass for the new config; what the node runs; why (for the log);
        `touching` is called just before Quay's container is first stopped or replaced."""
        cfg = one.cfg
        spec = one.prepare()  # fetched, validated, pulled: Quay is untouched so far
        decided = one.decide(spec)
        action = decided[1]
        key = (spec.labels[STACK_VERSION], spec.labels[IMAGE_DIGEST], spec.labels[SPEC_HASH])
        if action.kind == "adopt":
            log.debug("rollout.unchanged", why=why)
            return Rolled("unchanged", cfg=cfg)
        if action.kind != "replace":  # missing, stopped or not ours: the watchdog's business
            log.info("rollout.skipped", why=why, action=action.kind, reason=action.reason)
            return Rolled("skipped")
        if one.store.is_rejected(*key):
            one.store.switch_current(live.stack_version)
            log.debug("rollout.still_rejected", version=key[0][:12], image=key[1])
            return Rolled("rejected")
        leases = self._leases_for(cfg.stack)
        canary = None
        if spec.labels[IMAGE_DIGEST] != live.spec.labels[IMAGE_DIGEST]:
            canary = self._canary_gate(leases, spec.labels[IMAGE_DIGEST], cfg.rollout.lease_ttl)
            if canary == "stop":
                one.store.reject(*key)
                one.store.switch_current(live.stack_version)
                return Rolled("stopped")
        budget = Budget(leases, self.me, cfg.rollout.max_unavailable, cfg.rollout.lease_ttl,
                        self.clock)
        slot = budget.acquire(f"{why}: {action.reason}", self.sleep, self.poll)
        try:
            budget.keep(slot, f"{why}: {action.reason}")
            log.info("rollout.replacing", why=why, reason=action.reason,
                     canary=canary == "canary", version=key[0], image=key[1])
            touching()
            _, container_id = one.reconcile(one.docker, spec, decided)
            probe = one.wait_healthy(container_id)
            if probe.ok:
                one.store.mark_known_good(key[0])
                self._canary_done(leases, canary, spec.labels[IMAGE_DIGEST], "healthy")
                return Rolled("applied", Live(cfg, spec, key[0], container_id, one.health_url), cfg,
                              {"why": why, "result": "applied", "version": key[0],
                               "image": key[1]},
                              ("info", "rollout.applied",
                               {"why": why, "version": key[0], "image": key[1]}))
            log.error("rollout.rolling_back", why=why, version=key[0], image=key[1],
                      error=probe.error, services=probe.services)
            one.store.reject(*key)
            self._canary_done(leases, canary, spec.labels[IMAGE_DIGEST], "failed")
            one.store.switch_current(live.stack_version)
            _, container_id = one.reconcile(one.docker, live.spec)
            back = one.wait_healthy(container_id)
            return Rolled("rolled back", replace(live, container_id=container_id), live.cfg,
                          {"why": why, "result": "rolled back", "rejected_version": key[0],
                           "rejected_image": key[1], "error": probe.error},
                          ("warning", "rollout.rolled_back",
                           {"version": live.stack_version, "healthy": back.ok,
                            "rejected": key[0],
                            "note": "not retried until the source changes again"}))
        finally:
            budget.release(slot)

    def _leases_for(self, stack) -> LeaseStore:
        where = (stack.source, stack.endpoint_url, stack.region, stack.ca_bundle)
        if where not in self._leases:
            self._leases[where] = self.open_leases(stack)
        return self._leases[where]

    def _canary_gate(self, leases: LeaseStore, digest: str, ttl: float) -> str:
        """A new image: Quay migrates its database on the first start of a new version, so one
        node (the first to claim the upgrade record) goes first; the rest wait for its verdict.
        Returns "canary", "go" (the canary is healthy) or "stop" (it failed)."""
        waited = False
        while True:
            got = leases.get("upgrade")
            record = _json(got[0]) if got else None
            now = self.clock()
            stale = record is not None and record.get("state") == "rolling" and \
                now - float(record.get("since", 0)) > ttl
            if record is None or record.get("image") != digest or stale:
                body = self._record(digest, "rolling")
                claimed = leases.create("upgrade", body) if got is None else \
                    leases.replace("upgrade", body, got[1])
                if claimed:
                    log.info("rollout.canary", image=digest, node=self.me)
                    return "canary"
                continue
            if record.get("state") == "healthy":
                return "go"
            if record.get("state") == "failed":
                log.error("rollout.stopped", image=digest, canary=record.get("canary"),
                          note="the canary failed on this image and rolled back; fix it and "
                               "change the lock again")
                return "stop"
            if record.get("canary") == self.me:
                return "canary"  # this agent restarted mid-upgrade
            if not waited:
                log.info("rollout.waiting_for_canary", image=digest, canary=record.get("canary"))
                waited = True
            self.sleep(self.poll)

    def _canary_done(self, leases: LeaseStore, canary: Optional[str], digest: str,
                     state: str) -> None:
        if canary != "canary":
            return
        got = leases.get("upgrade")
        body = self._record(digest, state)
        if got is None or not leases.replace("upgrade", body, got[1]):
            leases.create("upgrade", body)

    def _record(self, digest: str, state: str) -> bytes:
        return json.dumps({"image": digest, "canary": self.me, "state": state,
                           "since": self.clock()}).encode()


def _json(data: bytes):
    try:
        value = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
