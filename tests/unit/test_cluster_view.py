"""The cluster view and the node records it is read from: pure tables, and the recorder's writes."""
from __future__ import annotations

import json

import pytest

from quay_bootstrap.cluster_view import exit_code, render, view
from quay_bootstrap.node_record import EVERY, RETRY, STALE_AFTER, NodeRecorder, due, key, record

V1, V2 = "a" * 64, "b" * 64
NOW = 10_000.0


def rec(state="healthy", version=V1, age=10.0, **more):
    return {"node": "n", "at": NOW - age, "state": state, "stack_version": version, **more}


@pytest.mark.parametrize("records,published,code,why", [
    ({"a": rec(), "b": rec()}, V1, 0, "all healthy on the published version"),
    ({"a": rec(), "b": rec(version=V2)}, V1, 1, "one not on the published version yet"),
    ({"a": rec(), "b": rec(state="starting")}, V1, 1, "one starting"),
    ({"a": rec(), "b": rec(held="rolled back: stack")}, V1, 1, "one held"),
    ({"a": rec(), "b": rec(draining=True)}, V1, 1, "one draining"),
    ({"a": rec(), "b": rec(marked_unhealthy=True)}, V1, 1, "one marked"),
    ({"a": rec(), "b": rec(state="failing", age=STALE_AFTER + 1)}, V1, 0,
     "a stale node is shown, not counted"),
    ({"a": rec(age=STALE_AFTER + 1)}, V1, 1, "no fresh node at all"),
    ({}, None, 1, "no record at all"),
    ({"a": rec(), "b": rec(), "c": rec(version=V2)}, None, 1,
     "nothing published: the version most nodes run is the target"),
    ({"a": rec(), "b": rec()}, None, 0, "nothing published, all on one version"),
])
def test_exit_code(records, published, code, why):
    cluster = view(records, NOW, {"version": published, "serial": 3} if published else None)
    assert exit_code(cluster) == code, why


def test_a_stale_node_is_shown_and_named_stale():
    cluster = view({"a": rec(), "gone": rec(age=STALE_AFTER + 5)}, NOW, {"version": V1})
    lines = render(cluster)
    gone = [line for line in lines if line.startswith("gone")]
    assert gone and "STALE" in gone[0]
    assert [n.name for n in cluster.nodes] == ["a", "gone"]
    assert lines[-1].startswith("ok:")


@pytest.mark.parametrize("last,new,now,expected", [
    (None, {"at": 0, "state": "healthy"}, 0, True),
    ({"at": 0, "state": "healthy"}, {"at": 10, "state": "healthy"}, 10, False),
    ({"at": 0, "state": "healthy"}, {"at": 10, "state": "failing"}, 10, True),
    ({"at": 0, "state": "healthy"}, {"at": EVERY, "state": "healthy"}, EVERY, True),
])
def test_due(last, new, now, expected):
    assert due(last, new, now) is expected


def test_a_record_keeps_what_the_cluster_view_shows_and_nothing_else():
    snapshot = {"state": "healthy", "stack_version": V1, "last_probe": {"at": 1},
                "endtoend": {"ok": True}, "held": None}
    assert record(snapshot, "i-1:quay", 5.0) == {"node": "i-1:quay", "at": 5.0,
                                                 "state": "healthy", "stack_version": V1}


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_steady_state_costs_one_put_per_five_minutes_and_a_change_one_more():
    puts, clock = [], Clock()
    recorder = NodeRecorder(lambda k, data: puts.append((k, json.loads(data))), "i-1:quay", clock,
                            spawn=lambda fn: fn())
    snapshot = {"state": "healthy", "stack_version": V1}
    for second in range(0, 3600, 10):  # an hour of loop turns, every 10 s
        clock.now = float(second)
        if second == 1710:
            snapshot = {**snapshot, "state": "failing"}
        recorder.tend(snapshot)
    assert puts[0][0] == key("i-1:quay") == "nodes/i-1:quay.json"
    assert [p[1]["at"] for p in puts] == [0, 300, 600, 900, 1200, 1500, 1710, 2010, 2310, 2610,
                                          2910, 3210, 3510]
    assert puts[6][1]["state"] == "failing"  # the change went out at the turn it was seen


def test_a_failing_store_is_retried_after_a_minute_not_every_turn():
    tries, clock = [], Clock()

    def put(k, data):
        tries.append(clock.now)
        raise OSError("denied")

    recorder = NodeRecorder(put, "n", clock, spawn=lambda fn: fn())
    for second in range(0, 200, 5):
        clock.now = float(second)
        recorder.tend({"state": "healthy"})
    assert tries == [0, RETRY, 2 * RETRY, 3 * RETRY]
