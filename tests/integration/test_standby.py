"""Standby on moto's Auto Scaling over HTTP: this instance (named by an IMDSv2 stand-in) moves
into Standby and back, with the group's desired capacity following; failures are False and a
hint, never an exception."""
from __future__ import annotations

import pytest

from quay_bootstrap.aws import Standby
from tests.fakes import captured_logs, events
from tests.integration.asg_standin import AsgStandIn, make_group
from tests.integration.conftest import free_port


@pytest.fixture
def group(s3, moto_endpoint, monkeypatch):
    """A group "quay" of two InService instances (MinSize 1) on moto, and an IMDSv2 stand-in
    naming the first; `.asg` is a client on moto, `.others` the other instance ids."""
    asg, instances = make_group(moto_endpoint, 2)
    # AWS refuses to decrement DesiredCapacity below MinSize (moto does not check): leave room.
    asg.update_auto_scaling_group(AutoScalingGroupName="quay", MinSize=1)
    standin = AsgStandIn(moto_endpoint, instances[0])
    standin.asg = asg
    standin.others = instances[1:]
    for name, value in {"AWS_EC2_METADATA_SERVICE_ENDPOINT": standin.url + "/",
                        "AWS_ENDPOINT_URL": moto_endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    yield standin
    standin.close()


def seen(group, instance=None):
    """(the instance's LifecycleState, the group's DesiredCapacity, its InService count)."""
    found = group.asg.describe_auto_scaling_instances(
        InstanceIds=[instance or group.instance_id])["AutoScalingInstances"]
    quay = group.asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=["quay"])["AutoScalingGroups"][0]
    serving = sum(i["LifecycleState"] == "InService" for i in quay["Instances"])
    return found[0]["LifecycleState"] if found else None, quay["DesiredCapacity"], serving


def test_enter_then_exit_moves_the_instance_and_the_desired_capacity(group):
    standby = Standby(region="us-east-1")
    assert seen(group) == ("InService", 2, 2)
    with captured_logs() as logs:
        assert standby.enter("upgrade to v3.11.0") is True
        assert standby.in_standby
        # Out of service, and no replacement launched: the desired capacity went down with it.
        assert seen(group) == ("Standby", 1, 1)
        assert seen(group, group.others[0])[0] == "InService"
        assert standby.exit() is True
        assert not standby.in_standby
        assert seen(group) == ("InService", 2, 2)
        assert standby.exit() is True  # nothing left to undo: no second ExitStandby
        assert seen(group) == ("InService", 2, 2)
    entered, = events(logs, "standby.entered")
    assert entered["instance"] == group.instance_id
    assert entered["group"] == "quay"
    assert entered["reason"] == "upgrade to v3.11.0"
    assert entered["already"] is False
    assert len(events(logs, "standby.exited")) == 1
    assert events(logs, "standby.failed") == []


def test_an_instance_found_in_standby_is_remembered_and_moved_back(group):
    group.asg.enter_standby(AutoScalingGroupName="quay", InstanceIds=[group.instance_id],
                            ShouldDecrementDesiredCapacity=True)
    standby = Standby()
    with captured_logs() as logs:
        assert standby.enter("restart") is True
        assert seen(group) == ("Standby", 1, 1)  # not decremented a second time
        assert standby.exit() is True
    assert seen(group) == ("InService", 2, 2)
    assert events(logs, "standby.entered")[0]["already"] is True


def test_exit_without_enter_leaves_the_group_alone(group):
    assert Standby().exit() is True
    assert seen(group) == ("InService", 2, 2)


def test_an_instance_in_no_group_is_false_with_the_hint(group):
    elsewhere = AsgStandIn(group.moto.geturl(), "i-0123456789abcdef0")
    try:
        standby = Standby(id_lookup=lambda: elsewhere.instance_id)
        with captured_logs() as logs:
            assert standby.enter("restart") is False
            assert not standby.in_standby
            assert standby.exit() is True  # nothing to undo
    finally:
        elsewhere.close()
    failed, = events(logs, "standby.failed")
    assert failed["problem"] == "not_in_group"
    assert failed["instance"] == "i-0123456789abcdef0"
    for action in ("autoscaling:EnterStandby", "autoscaling:ExitStandby",
                   "autoscaling:DescribeAutoScalingInstances"):
        assert action in failed["hint"]
    assert seen(group) == ("InService", 2, 2)


def test_the_instance_id_comes_from_imds(group, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{free_port()}/")
    with captured_logs() as logs:
        assert Standby().enter("restart") is False
    assert events(logs, "standby.failed")[0]["problem"] == "no_instance_id"
    assert seen(group) == ("InService", 2, 2)


def test_auto_scaling_unreachable_is_false_by_the_deadline_not_an_exception(group, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries would take seconds
    with captured_logs() as logs:
        assert Standby().enter("restart", timeout=1.0, every=0.2) is False
    failed, = events(logs, "standby.failed")
    assert failed["problem"] == "timeout"
    assert "Could not connect" in failed["error"]
    assert len(events(logs, "standby.retrying")) >= 2
