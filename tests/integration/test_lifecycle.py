"""Auto Scaling lifecycle hooks: join only when healthy, drain before leaving; Quay is the
stand-in on the bed's real PostgreSQL and Redis."""
from __future__ import annotations

import pytest

from tests.integration.conftest import wait_for
from tests.testbed.quay_standin import HEADS

pytestmark = pytest.mark.standin


def env(standin):
    return {"AWS_ENDPOINT_URL": standin.url, "AWS_EC2_METADATA_SERVICE_ENDPOINT": standin.url + "/"}


HOOKS = {"launch_hook": "quay-launch", "termination_hook": "quay-terminate",
         "heartbeat_interval": "1s"}


def test_launch_waits_with_heartbeats_then_continues_once_healthy(node, daemon, asg_group):
    node.state("fail web_gunicorn")
    agent = daemon(env=env(asg_group), health={"start_period": "60s"},
                   report={"lifecycle": HOOKS})
    wait_for(lambda: len(asg_group.actions("RecordLifecycleActionHeartbeat")) >= 2, 15,
             "heartbeats while Quay is not healthy")
    assert asg_group.actions("CompleteLifecycleAction") == []
    node.state("healthy")
    wait_for(lambda: asg_group.actions("CompleteLifecycleAction"), 15, "CONTINUE")
    done = asg_group.actions("CompleteLifecycleAction")
    assert len(done) == 1
    assert done[0]["LifecycleActionResult"] == "CONTINUE"
    assert done[0]["LifecycleHookName"] == "quay-launch"
    assert done[0]["AutoScalingGroupName"] == "quay"
    assert done[0]["InstanceId"] == asg_group.instance_id
    assert agent.status()["state"] == "healthy"


def test_launch_is_abandoned_when_quay_is_not_healthy_in_time(node, daemon, asg_group):
    node.state("fail web_gunicorn")
    daemon(env=env(asg_group), health={"start_period": "3s"}, report={"lifecycle": HOOKS})
    wait_for(lambda: asg_group.actions("CompleteLifecycleAction"), 20, "ABANDON")
    assert asg_group.actions("CompleteLifecycleAction")[0]["LifecycleActionResult"] == "ABANDON"


def test_termination_drains_quay_then_continues(node, daemon, asg_group):
    agent = daemon(env=env(asg_group), report={"lifecycle": HOOKS})
    agent.wait_state("healthy")
    wait_for(lambda: asg_group.actions("CompleteLifecycleAction"), 15, "the launch CONTINUE")
    asg_group.lifecycle_state = "Terminated"
    wait_for(lambda: len(asg_group.actions("CompleteLifecycleAction")) == 2, 20,
             "the termination CONTINUE")
    last = asg_group.actions("CompleteLifecycleAction")[-1]
    assert last["LifecycleHookName"] == "quay-terminate"
    assert last["LifecycleActionResult"] == "CONTINUE"
    assert node.found().status == "exited"  # drained, and not restarted after
    assert "received SIGTERM" in node.logs()  # stopped, not killed
    assert agent.status()["state"] == "terminating"
    assert node.revision() == HEADS["v3.11.0"]
