"""The cluster's disruption budget: leases in the object store the cluster already has.

At most `rollout.max_unavailable` nodes take their Quay out of service at the same time. A node
takes one of that many lease objects next to the stack with a conditional create (S3
`IfNoneMatch="*"`, GCS `if_generation_match=0`, O_EXCL on a directory), renews it while it
holds it, and gives it back with a conditional replace; a node that dies mid-roll blocks the
others only until its lease expires, when the next node takes it over with a conditional
overwrite of exactly what it read.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import structlog

if TYPE_CHECKING:
    from quay_bootstrap.stores import LeaseStore

log = structlog.get_logger(__name__)
RENEW_RETRY = 5.0  # seconds after a failed renewal before the next try


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


def swap(store: LeaseStore, key: str, got: Optional[Tuple[bytes, str]], body: bytes) -> bool:
    """The one compare-and-swap on the lease store: write `body` over exactly what `got` read
    (`store.get(key)`: None for an absent object, created only if still absent). False when
    another node wrote in between."""
    return store.create(key, body) if got is None else store.replace(key, body, got[1])


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
                if swap(self.store, key, got, body):
                    return slot
                continue
            current = LeaseBody.decode(got[0])
            if may_take(current, self.me, self.clock()) and swap(self.store, key, got, body):
                if current and current.holder != self.me and current.expires > 0:  # not released
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
            wait = self.ttl / 3
            while not released.wait(wait):
                try:
                    if not self.renew(slot, reason):
                        return
                    wait = self.ttl / 3
                except Exception as err:  # noqa: BLE001 - a blink: tried again soon, not in
                    # a third of ttl, so two blinks in a row do not let the lease run out
                    log.warning("rollout.lease_renew_failed", slot=slot, error=str(err))
                    wait = min(self.ttl / 3, RENEW_RETRY)

        threading.Thread(target=renew, name=f"lease-{slot}", daemon=True).start()

    def renew(self, slot: int, reason: str = "") -> bool:
        """Push the lease's expiry `ttl` ahead; False when it is no longer this node's."""
        key = f"lease-{slot}"
        got = self.store.get(key)
        current = None if got is None else LeaseBody.decode(got[0])
        body = LeaseBody(self.me, self.clock() + self.ttl, reason).encode()
        if current is None or current.holder != self.me or current.expires <= self.clock() or \
                not swap(self.store, key, got, body):
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
                        swap(self.store, key, got, LeaseBody(self.me, 0.0, "released").encode())
        except Exception as err:  # noqa: BLE001 - the lease expires by itself
            log.error("rollout.lease_release_failed", slot=slot, error=str(err),
                      note=f"the other nodes wait until it expires ({self.ttl:g}s)")
            return
        log.info("rollout.lease_released", slot=slot, holder=self.me)


class Lease:
    """A slot of the budget this node holds, made by `take` or `try_take`, which keep it alive
    (Budget.keep: a thread of its own) until it is released; the constructor starts nothing. A
    context manager (released on exit); `release` is idempotent. `held` is the registry of this
    node's leases that /status shows (holder, slot, reason)."""

    def __init__(self, budget: Budget, slot: int, reason: str,
                 held: Optional[Dict[str, dict]] = None) -> None:
        self.budget, self.slot, self.reason = budget, slot, reason
        self._held = held if held is not None else {}
        self._key = f"{budget.me}#{slot}"
        self._released = False
        self._held[self._key] = {"holder": budget.me, "slot": slot, "reason": reason}

    @classmethod
    def take(cls, budget: Budget, reason: str, sleep: Callable[[float], None],
             poll: float = 2.0, held: Optional[Dict[str, dict]] = None) -> "Lease":
        """Wait for a slot (Budget.acquire) and keep it."""
        return cls(budget, budget.acquire(reason, sleep, poll), reason, held).keep_alive()

    @classmethod
    def try_take(cls, budget: Budget, reason: str,
                 held: Optional[Dict[str, dict]] = None) -> Optional["Lease"]:
        """A slot now, or None when all are held."""
        slot = budget.try_acquire(reason)
        return None if slot is None else cls(budget, slot, reason, held).keep_alive()

    def keep_alive(self) -> "Lease":
        self.budget.keep(self.slot, self.reason)
        return self

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held.pop(self._key, None)
        self.budget.release(self.slot)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
