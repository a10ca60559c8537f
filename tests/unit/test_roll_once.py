"""`run --once` decides again after waiting for another node's canary (rollout.Roll.once)."""
from __future__ import annotations

from tests.fakes import V3, FakePass, Release, captured_logs, events
from tests.unit.test_roll import Node, upgrade_record


def test_run_once_waiting_for_a_canary_starts_what_the_source_says_after_the_wait():
    node = Node(me="node-b")
    node.leases.put("upgrade", upgrade_record(V3, "node-a", "rolling", node.clock()))
    one = FakePass(node.cfg, node.docker, node.store, V3)
    newer = Release("stack-v4", V3.digest, V3.image_id, V3.tag)

    def meanwhile(clock):  # node-a's Quay answers, and the stack changes once more
        node.leases.put("upgrade", upgrade_record(V3, "node-a", "healthy", clock()))
        one.release = newer

    node.clock.on_sleep = meanwhile
    with captured_logs() as logs:
        outcome = node.roll.once(one)
    assert outcome.healthy and node.clock.slept == [2.0]
    assert node.quay() == (newer.version, newer.digest, "running")
    assert [e["canary"] for e in events(logs, "rollout.waiting_for_canary")] == ["node-a"]
    assert [step.name for step in outcome.steps].count("container") == 1
