"""Auto Scaling lifecycle hooks: a new instance joins only once Quay is healthy, and a leaving
instance drains Quay before it goes.

Launch (`report.lifecycle.launch_hook`): the instance waits in Pending:Wait; the agent sends
heartbeats until Quay is healthy, then CONTINUE (ABANDON when not healthy within start_period),
so the load balancer only ever gets healthy nodes. Termination (`termination_hook`): when IMDS
says the target lifecycle state is Terminated, the agent stops Quay gracefully, then CONTINUE.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import structlog

from quay_bootstrap.report import imds_get, instance_id

log = structlog.get_logger(__name__)


def target_lifecycle_state(environ=os.environ, timeout: float = 1.0) -> Optional[str]:
    """IMDSv2 autoscaling/target-lifecycle-state ("InService", "Terminated", ...) or None."""
    return imds_get("/latest/meta-data/autoscaling/target-lifecycle-state", environ, timeout)


class Lifecycle:
    """Args: `report.lifecycle` config; the AWS region; how to learn the instance id."""

    def __init__(self, hooks, region: Optional[str] = None,
                 id_lookup: Callable[[], Optional[str]] = instance_id,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hooks = hooks
        self.region = region
        self._id_lookup = id_lookup
        self.clock = clock
        self._client = None
        self._instance: Optional[str] = None
        self._group: Optional[str] = None
        self.launch_finished = not hooks.launch_hook
        self._last_heartbeat = float("-inf")

    def _where(self):
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client("autoscaling", region_name=self.region)
            self._instance = self._id_lookup()
            if self._instance:
                found = self._client.describe_auto_scaling_instances(
                    InstanceIds=[self._instance]).get("AutoScalingInstances", [])
                self._group = found[0]["AutoScalingGroupName"] if found else None
        return self._client, self._instance, self._group

    def _complete(self, hook: str, result: str) -> bool:
        client, instance, group = self._where()
        if not (instance and group):
            log.error("lifecycle.no_group", hook=hook, instance=instance,
                      hint="IMDSv2 must answer and the instance must be in an Auto Scaling group")
            return False
        client.complete_lifecycle_action(LifecycleHookName=hook, AutoScalingGroupName=group,
                                         LifecycleActionResult=result, InstanceId=instance)
        log.info("lifecycle.completed", hook=hook, result=result, instance=instance, group=group)
        return True

    def launch_heartbeat(self) -> None:
        """While waiting for Quay: keep the instance in Pending:Wait (at most every interval)."""
        if self.launch_finished or self.clock() - self._last_heartbeat < \
                self.hooks.heartbeat_interval:
            return
        self._last_heartbeat = self.clock()
        client, instance, group = self._where()
        if instance and group:
            client.record_lifecycle_action_heartbeat(
                LifecycleHookName=self.hooks.launch_hook, AutoScalingGroupName=group,
                InstanceId=instance)
            log.debug("lifecycle.heartbeat", hook=self.hooks.launch_hook)

    def launch_done(self, healthy: bool) -> None:
        """CONTINUE once Quay is healthy; ABANDON when it was not within start_period."""
        if self.launch_finished:
            return
        self.launch_finished = True
        self._complete(self.hooks.launch_hook, "CONTINUE" if healthy else "ABANDON")

    def termination_requested(self) -> bool:
        return bool(self.hooks.termination_hook) and target_lifecycle_state() == "Terminated"

    def termination_done(self) -> None:
        self._complete(self.hooks.termination_hook, "CONTINUE")
