"""The lease budget from tables, on an in-memory store with the same conditional semantics."""
from __future__ import annotations

import pytest

from quay_bootstrap.budget import Budget, LeaseBody, may_take
from quay_bootstrap.stores.file import FileLeases


class MemoryStore:
    """Conditional create/replace like S3's IfNoneMatch/IfMatch; versions are counters."""

    def __init__(self):
        self.objects = {}
        self.version = 0

    def get(self, key):
        return self.objects.get(key)

    def create(self, key, data):
        if key in self.objects:
            return False
        self.version += 1
        self.objects[key] = (data, str(self.version))
        return True

    def replace(self, key, data, token):
        if key not in self.objects or self.objects[key][1] != token:
            return False
        self.version += 1
        self.objects[key] = (data, str(self.version))
        return True

    def delete(self, key):
        self.objects.pop(key, None)


@pytest.mark.parametrize("current,me,now,expect", [
    (None, "a", 0, True),
    (LeaseBody("a", 100), "a", 50, True),    # ours: renew
    (LeaseBody("b", 100), "a", 50, False),   # someone else's, alive
    (LeaseBody("b", 100), "a", 100, True),   # expired
])
def test_may_take(current, me, now, expect):
    assert may_take(current, me, now) is expect


def test_one_slot_one_holder_until_release_or_expiry():
    store, clock = MemoryStore(), [1000.0]
    a = Budget(store, "a", slots=1, ttl=60, clock=lambda: clock[0])
    b = Budget(store, "b", slots=1, ttl=60, clock=lambda: clock[0])
    assert a.try_acquire() == 0
    assert b.try_acquire() is None
    a.release(0)
    assert b.try_acquire() == 0
    clock[0] += 61  # b died holding it
    assert a.try_acquire() == 0


def test_max_unavailable_slots():
    store = MemoryStore()
    budgets = [Budget(store, name, slots=2, ttl=60, clock=lambda: 0.0) for name in "abc"]
    assert [b.try_acquire() for b in budgets] == [0, 1, None]


def test_a_release_never_deletes_another_holders_lease():
    store, clock = MemoryStore(), [0.0]
    a = Budget(store, "a", slots=1, ttl=10, clock=lambda: clock[0])
    b = Budget(store, "b", slots=1, ttl=10, clock=lambda: clock[0])
    a.try_acquire()
    clock[0] = 11
    assert b.try_acquire() == 0  # a's lease expired: b took it over
    a.release(0)  # a wakes up late
    assert LeaseBody.decode(store.get("lease-0")[0]).holder == "b"


def test_an_unreadable_lease_cannot_block_the_cluster():
    store = MemoryStore()
    store.create("lease-0", b"not json")
    assert Budget(store, "a", slots=1, ttl=10, clock=lambda: 0.0).try_acquire() == 0


def test_wait_uses_the_given_sleep():
    store = MemoryStore()
    Budget(store, "b", slots=1, ttl=10, clock=lambda: 0.0).try_acquire()
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        store.delete("lease-0")  # b finishes

    assert Budget(store, "a", slots=1, ttl=10, clock=lambda: 0.0).acquire("x", sleep) == 0
    assert waits == [2.0]


def test_the_budget_on_directory_leases(tmp_path):
    leases, clock = FileLeases(f"file://{tmp_path}/leases"), [0.0]
    a = Budget(leases, "a", slots=1, ttl=10, clock=lambda: clock[0])
    b = Budget(leases, "b", slots=1, ttl=10, clock=lambda: clock[0])
    assert a.try_acquire() == 0 and b.try_acquire() is None
    clock[0] = 11
    assert b.try_acquire() == 0
    a.release(0)
    assert LeaseBody.decode(leases.get("lease-0")[0]).holder == "b"


def test_a_held_lease_is_renewed_and_never_taken_over_while_its_holder_lives(tmp_path):
    """Real time, a 0.3 s lease held for 1.2 s: the other node never gets the slot."""
    import time

    store = FileLeases(f"file://{tmp_path}")
    mine = Budget(store, "node-a", slots=1, ttl=0.3)
    other = Budget(store, "node-b", slots=1, ttl=0.3)
    slot = mine.try_acquire("roll")
    mine.keep(slot, "roll")
    until = time.time() + 1.2
    while time.time() < until:
        assert other.try_acquire("roll") is None
        time.sleep(0.05)
    mine.release(slot)
    assert other.try_acquire("roll") == 0


def test_a_lease_whose_holder_stopped_renewing_expires(tmp_path):
    import time

    store = FileLeases(f"file://{tmp_path}")
    Budget(store, "dead", slots=1, ttl=0.2).try_acquire("roll")  # never kept, never released
    time.sleep(0.3)
    assert Budget(store, "alive", slots=1, ttl=0.2).try_acquire("roll") == 0


def test_renewing_a_lease_someone_else_took_says_so():
    store = MemoryStore()
    clock = [100.0]
    mine = Budget(store, "a", slots=1, ttl=10, clock=lambda: clock[0])
    slot = mine.try_acquire()
    clock[0] += 11  # stalled past its own expiry; b takes over
    assert Budget(store, "b", slots=1, ttl=10, clock=lambda: clock[0]).try_acquire() == slot
    assert mine.renew(slot) is False
    assert LeaseBody.decode(store.get("lease-0")[0]).holder == "b"


# --- the Lease: one slot taken, kept and given back ------------------------------------------

def test_a_lease_is_a_context_manager_that_gives_its_slot_back_once():
    from quay_bootstrap.budget import Lease

    store, held = MemoryStore(), {}
    budget = Budget(store, "node-a/roll", 1, 600.0, clock=lambda: 1000.0)
    with Lease.try_take(budget, "refresh: new stack", held) as lease:
        assert held == {"node-a/roll#0": {"holder": "node-a/roll", "slot": 0,
                                          "reason": "refresh: new stack"}}
        assert LeaseBody.decode(store.objects["lease-0"][0]).holder == "node-a/roll"
        other = Budget(store, "node-b/roll", 1, 600.0, clock=lambda: 1000.0)
        assert Lease.try_take(other, "refresh") is None  # the one slot is taken
    assert held == {} and LeaseBody.decode(store.objects["lease-0"][0]).expires == 0.0
    version = store.version
    lease.release()  # again: nothing written
    assert store.version == version
    assert Lease.try_take(other, "refresh").slot == 0


def test_taking_a_released_lease_is_not_a_takeover():
    from tests.fakes import captured_logs, events

    store = MemoryStore()
    first = Budget(store, "node-a/roll", 1, 600.0, clock=lambda: 1000.0)
    first.release(first.try_acquire("roll"))
    with captured_logs() as logs:
        assert Budget(store, "node-b/roll", 1, 600.0, clock=lambda: 1000.0).try_acquire() == 0
    assert events(logs, "rollout.lease_taken_over") == []
    with captured_logs() as logs:  # node-b's lease ran out 900 s ago: that one is taken over
        assert Budget(store, "node-c/roll", 1, 600.0, clock=lambda: 2500.0).try_acquire() == 0
    assert [e["expired_seconds_ago"] for e in events(logs, "rollout.lease_taken_over")] == [900.0]
