"""Auto Scaling lifecycle hooks: join only when healthy, drain before leaving."""
from __future__ import annotations

import boto3
import pytest

from tests.integration.asg_standin import AsgStandIn
from tests.integration.conftest import wait_for


@pytest.fixture
def group(s3, moto_endpoint):
    """An Auto Scaling group on moto with one instance, behind the stand-in."""
    asg = boto3.client("autoscaling", region_name="us-east-1", endpoint_url=moto_endpoint,
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    asg.create_launch_configuration(LaunchConfigurationName="quay", ImageId="ami-12c6146b",
                                    InstanceType="t3.medium")
    asg.create_auto_scaling_group(AutoScalingGroupName="quay", LaunchConfigurationName="quay",
                                  MinSize=1, MaxSize=1, DesiredCapacity=1,
                                  AvailabilityZones=["us-east-1a"])
    found = asg.describe_auto_scaling_groups(AutoScalingGroupNames=["quay"])
    instance = found["AutoScalingGroups"][0]["Instances"][0]["InstanceId"]
    standin = AsgStandIn(moto_endpoint, instance)
    yield standin
    standin.close()


def env(standin):
    return {"AWS_ENDPOINT_URL": standin.url, "AWS_EC2_METADATA_SERVICE_ENDPOINT": standin.url + "/"}


HOOKS = {"launch_hook": "quay-launch", "termination_hook": "quay-terminate",
         "heartbeat_interval": "1s"}


def test_launch_waits_with_heartbeats_then_continues_once_healthy(node, daemon, group):
    node.state("fail web_gunicorn")
    agent = daemon(env=env(group), health={"start_period": "60s"},
                   report={"lifecycle": HOOKS})
    wait_for(lambda: len(group.actions("RecordLifecycleActionHeartbeat")) >= 2, 15,
             "heartbeats while Quay is not healthy")
    assert group.actions("CompleteLifecycleAction") == []
    node.state("healthy")
    wait_for(lambda: group.actions("CompleteLifecycleAction"), 15, "CONTINUE")
    done = group.actions("CompleteLifecycleAction")
    assert len(done) == 1
    assert done[0]["LifecycleActionResult"] == "CONTINUE"
    assert done[0]["LifecycleHookName"] == "quay-launch"
    assert done[0]["AutoScalingGroupName"] == "quay"
    assert done[0]["InstanceId"] == group.instance_id
    assert agent.status()["state"] == "healthy"


def test_launch_is_abandoned_when_quay_is_not_healthy_in_time(node, daemon, group):
    node.state("fail web_gunicorn")
    daemon(env=env(group), health={"start_period": "3s"}, report={"lifecycle": HOOKS})
    wait_for(lambda: group.actions("CompleteLifecycleAction"), 20, "ABANDON")
    assert group.actions("CompleteLifecycleAction")[0]["LifecycleActionResult"] == "ABANDON"


def test_termination_drains_quay_then_continues(node, daemon, group):
    agent = daemon(env=env(group), report={"lifecycle": HOOKS})
    agent.wait_state("healthy")
    wait_for(lambda: group.actions("CompleteLifecycleAction"), 15, "the launch CONTINUE")
    group.lifecycle_state = "Terminated"
    wait_for(lambda: len(group.actions("CompleteLifecycleAction")) == 2, 20,
             "the termination CONTINUE")
    last = group.actions("CompleteLifecycleAction")[-1]
    assert last["LifecycleHookName"] == "quay-terminate"
    assert last["LifecycleActionResult"] == "CONTINUE"
    assert node.found().status == "exited"  # drained, and not restarted after
    assert agent.status()["state"] == "terminating"
