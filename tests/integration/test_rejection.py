"""A version Quay was not healthy on stays rejected across agent restarts: it is neither
downloaded nor applied again until the source changes, and `current` never points at it."""
from __future__ import annotations

from tests.integration.conftest import wait_for, wait_for_lines

HEALTH = {"interval": "10s", "timeout": "1s", "failure_threshold": 2, "start_period": "4s"}


def test_a_rolled_back_version_is_not_fetched_or_applied_again_after_a_restart(node, daemon):
    agent = daemon(health=HEALTH, refresh_interval="1s")
    agent.wait_state("healthy")
    good, _ = node.agent.live()
    node.backend.put("fake-health", b"fail web_gunicorn\n")  # the busybox fake's 503
    wait_for(lambda: '"rollout.rolled_back"' in agent.log, 40, "the rollback")
    agent.wait_state("healthy")
    agent.stop()

    again = daemon(health=HEALTH, refresh_interval="1s")  # a restart, e.g. an agent upgrade
    again.wait_state("healthy")
    # Several refreshes, each of which reads the source and refuses the rejected version.
    wait_for_lines(again, "stack.still_rejected", 3, timeout=15)
    assert '"rollout.replacing"' not in again.log and '"stack.applied"' not in again.log
    assert node.agent.live()[0] == good  # `current` never moved to the rejected version
    assert node.found().labels["io.quay-bootstrap.stack-version"] == good

    # The source changes (the fix): it is fetched and applied.
    node.backend.put("fake-health", b"healthy\n")
    wait_for(lambda: '"rollout.applied"' in again.log, 30, "the fixed stack applied")
    assert node.agent.live()[0] != good
