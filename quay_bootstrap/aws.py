"""AWS, where the node runs on it: IMDSv2, the Auto Scaling group's health record and lifecycle
hooks, and RDS's view of the database. botocore is imported only when a call is made; every
client comes from the process's one session (`aws_session`)."""
from __future__ import annotations

import os
import time
import urllib.request
from typing import Callable, Optional

import structlog

log = structlog.get_logger(__name__)

IMDS_ENV = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
IMDS_DEFAULT = "http://169.254.169.254/"


def imds_get(path: str, environ=os.environ, timeout: float = 1.0) -> Optional[str]:
    """GET an IMDSv2 path (a session token first), or None when no metadata service answers.

    The address honours AWS_EC2_METADATA_SERVICE_ENDPOINT, the AWS SDKs' standard setting.
    """
    base = environ.get(IMDS_ENV, IMDS_DEFAULT).rstrip("/")
    try:
        token_req = urllib.request.Request(f"{base}/latest/api/token", method="PUT", headers={
            "X-aws-ec2-metadata-token-ttl-seconds": "300"})
        with urllib.request.urlopen(token_req, timeout=timeout) as response:
            token = response.read().decode()
        request = urllib.request.Request(f"{base}{path}",
                                         headers={"X-aws-ec2-metadata-token": token})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read().decode().strip() or None
    except OSError:
        return None


def instance_id(environ=os.environ, timeout: float = 1.0) -> Optional[str]:
    """This instance's id from IMDSv2, or None when no metadata service answers."""
    return imds_get("/latest/meta-data/instance-id", environ, timeout)


def node_id(cfg, environ=os.environ, machine_id: str = "/etc/machine-id") -> str:
    """This node's name in leases and the canary record: the cloud instance id (asked only
    when report.autoscaling allows AWS), else /etc/machine-id, then the container's name (two
    agents on one machine are two nodes). Host names collide on cloned VMs; these do not."""
    found = instance_id(environ) if cfg.report.autoscaling is not False else None
    if not found:
        try:
            found = open(machine_id, encoding="ascii").read().strip() or None
        except OSError:
            found = None
    if not found:
        import socket

        found = socket.gethostname()
        log.warning("node.no_machine_id", path=machine_id, using=found,
                    hint="cloned machines must get a machine id of their own "
                         "(systemd-machine-id-setup)")
    return f"{found}:{cfg.container.name}"


class AutoScaling:
    """Marks this instance Unhealthy in its Auto Scaling group, so the group replaces it."""

    def __init__(self, mode, region: Optional[str] = None,
                 id_lookup: Callable[[], Optional[str]] = instance_id) -> None:
        self.mode = mode
        self.region = region
        self._id_lookup = id_lookup

    def mark_unhealthy(self, reason: str) -> bool:
        if self.mode is False:
            return False
        import tenacity

        from quay_bootstrap import aws_session

        instance = self._id_lookup()
        if not instance:
            if self.mode is True:
                log.error("autoscaling.no_instance_id",
                          hint=f"report.autoscaling is true but IMDSv2 did not answer; check "
                               f"{IMDS_ENV} and the instance's metadata options")
            return False
        client = aws_session.client("autoscaling", region_name=self.region)
        found = client.describe_auto_scaling_instances(InstanceIds=[instance])
        if not found.get("AutoScalingInstances"):
            log.info("autoscaling.not_in_a_group", instance=instance)
            return False
        for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(5),
                                         wait=tenacity.wait_random_exponential(max=10),
                                         reraise=True):
            with attempt:
                client.set_instance_health(InstanceId=instance, HealthStatus="Unhealthy",
                                           ShouldRespectGracePeriod=False)
        log.warning("autoscaling.marked_unhealthy", instance=instance, reason=reason)
        return True


def target_lifecycle_state(environ=os.environ, timeout: float = 1.0) -> Optional[str]:
    """IMDSv2 autoscaling/target-lifecycle-state ("InService", "Terminated", ...) or None."""
    return imds_get("/latest/meta-data/autoscaling/target-lifecycle-state", environ, timeout)


class Lifecycle:
    """Args: `report.lifecycle` config; the AWS region; how to learn the instance id."""

    def __init__(self, hooks, region: Optional[str] = None,
                 clock: Callable[[], float] = time.monotonic,
                 id_lookup: Callable[[], Optional[str]] = instance_id) -> None:
        from quay_bootstrap.periodic import Periodic

        self.hooks = hooks
        self.region = region or None
        self._id_lookup = id_lookup
        self.clock = clock
        self.began = clock()
        self._heartbeat = Periodic("lifecycle.failed", self.launch_heartbeat,
                                   hooks.heartbeat_interval, first=0, clock=clock)
        self._client = None
        self._instance: Optional[str] = None
        self._group: Optional[str] = None
        self.launch_finished = not hooks.launch_hook

    def _where(self):
        if self._client is None:
            from quay_bootstrap import aws_session

            self._client = aws_session.client("autoscaling", region_name=self.region)
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
        """While waiting for Quay: keep the instance in Pending:Wait (the daemon paces these)."""
        if self.launch_finished:
            return
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

    def launch_tick(self, healthy: bool, start_period: float) -> None:
        """Each turn of the loop until the launch hook is answered: CONTINUE once Quay is
        healthy, ABANDON when it was not within start_period, heartbeats meanwhile."""
        if self.launch_finished:
            return
        try:
            if healthy:
                self.launch_done(True)
            elif self.clock() - self.began > start_period:
                log.error("lifecycle.abandon",
                          reason=f"Quay was not healthy within start_period ({start_period:g}s)")
                self.launch_done(False)
            else:
                self._heartbeat.run_if_due()
        except Exception as err:  # noqa: BLE001 - retried on the next tick
            log.warning("lifecycle.failed", error=str(err))

    def watch_termination(self, stop, on_terminate: Callable[[], None],
                          every: float = 5.0) -> None:
        """A thread's loop: polls IMDS until the group wants the instance gone, then tells."""
        from quay_bootstrap.periodic import Warnings

        if not self.hooks.termination_hook:
            return
        failed = Warnings("lifecycle.poll_failed", clock=self.clock)
        while not stop.wait(every):
            try:
                if self.termination_requested():
                    on_terminate()
                    return
                failed.ok()
            except Exception as err:  # noqa: BLE001 - keep watching
                failed.warn(err)

    def termination_requested(self) -> bool:
        return bool(self.hooks.termination_hook) and target_lifecycle_state() == "Terminated"

    def drain(self, stop_quay: Callable[[], None]) -> None:
        """The instance is leaving: stop Quay gracefully, then CONTINUE the termination."""
        log.warning("lifecycle.terminating", hook=self.hooks.termination_hook)
        try:
            stop_quay()
            self.termination_done()
        except Exception as err:  # noqa: BLE001 - the group's timeout still ends it
            log.error("lifecycle.drain_failed", error=str(err))

    def termination_done(self) -> None:
        self._complete(self.hooks.termination_hook, "CONTINUE")


class Rds:
    """RDS says whether the database is mid-failover or stopped (not `available`)."""

    def __init__(self, rds) -> None:
        self.db_instance = rds.db_instance
        self.region = rds.region
        self.client = None

    def unavailable(self) -> bool:
        from quay_bootstrap import aws_session

        try:
            if self.client is None:
                self.client = aws_session.client("rds", region_name=self.region)
            found = self.client.describe_db_instances(DBInstanceIdentifier=self.db_instance)
            status = found["DBInstances"][0]["DBInstanceStatus"]
        except Exception as err:  # noqa: BLE001 - unknown means: judge by Quay's answer alone
            log.warning("rds.unknown", db_instance=self.db_instance, error=str(err))
            return False
        if status != "available":
            log.info("rds.not_available", db_instance=self.db_instance, status=status)
        return status != "available"


# Standby: out of the target groups' rotation for a planned stop of Quay, and back after.

STANDBY_IAM = ("the instance role needs autoscaling:EnterStandby, autoscaling:ExitStandby and "
               "autoscaling:DescribeAutoScalingInstances")

# standby_step's answers: what to do next.
CALL, WAIT, DONE, FAIL = "call", "wait", "done", "fail"
_RETURNING = ("Pending", "Pending:Wait", "Pending:Proceed")


def standby_step(goal: str, state: Optional[str], called: bool) -> str:
    """The next step towards GOAL ("enter": Standby; "exit": InService).

    Args: STATE is the instance's LifecycleState (None: it is in no group); CALLED says whether
    this attempt has already sent EnterStandby or ExitStandby.
    Returns: CALL (send it), WAIT (look again later), DONE or FAIL.
    """
    if goal == "enter":
        if state == "Standby":
            return DONE
        # Right after the call DescribeAutoScalingInstances may still say InService.
        if state == "EnteringStandby" or (state == "InService" and called):
            return WAIT
        return CALL if state == "InService" else FAIL
    if state == "InService":
        return DONE
    # EnteringStandby: an earlier enter still draining; ExitStandby only takes a Standby one.
    if state in _RETURNING or state == "EnteringStandby" or (state == "Standby" and called):
        return WAIT
    return CALL if state == "Standby" else FAIL


_TRANSIENT = frozenset({
    "Throttling", "ThrottlingException", "RequestLimitExceeded", "ResourceContention",
    "ServiceUnavailable", "InternalFailure", "InternalError", "RequestTimeout",
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"})
_DENIED = frozenset({
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "NoCredentialsError",
    "InvalidClientTokenId", "ExpiredToken", "UnrecognizedClientException"})


def standby_error(code: str) -> tuple[bool, str]:
    """For an AWS error code (or a botocore exception's class name): (worth retrying before the
    deadline, the problem's name for `standby.failed`)."""
    if code in _TRANSIENT:
        return True, "unavailable"
    if code in _DENIED:
        return False, "access_denied"
    if code == "ValidationError":
        return False, "rejected"
    return False, "error"


STANDBY_HINTS = {
    "no_instance_id": f"IMDSv2 did not answer; check {IMDS_ENV} and the instance's metadata options",
    "not_in_group": f"standby needs the instance in an Auto Scaling group; {STANDBY_IAM}",
    "access_denied": f"{STANDBY_IAM} (and credentials: an instance profile)",
    "rejected": "Auto Scaling refused: EnterStandby needs the instance InService and the group's "
                "DesiredCapacity above its MinSize (it is decremented by one); ExitStandby needs "
                "it in Standby",
    "wrong_state": "only an InService instance can enter Standby, only a Standby one can leave it",
    "unavailable": "Auto Scaling did not answer in time; the stop goes ahead without standby",
    "timeout": "EnteringStandby lasts until the target groups' deregistration delay has passed "
               "(300 s by default): allow for it, or shorten it; an instance returning in "
               "Pending:Wait waits for a launch lifecycle hook to be completed",
    "error": STANDBY_IAM,
}


def error_code(err: BaseException) -> str:
    """A ClientError's AWS code ("AccessDenied"), else the exception's class name."""
    response = getattr(err, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code or type(err).__name__


class Standby:
    """Moves this instance into Standby in its Auto Scaling group before a planned stop of Quay
    (the group's target groups deregister it, letting in-flight requests finish, and the group
    neither health-checks nor replaces it), and back InService once Quay is healthy again.

    Never raises for AWS's errors: each call says True or False and logs why; a planned stop
    without standby still happens (the caller decides). SLEEP may be a stop event's `wait`.
    """

    def __init__(self, region: Optional[str] = None,
                 id_lookup: Callable[[], Optional[str]] = instance_id,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        self.region = region or None
        self._id_lookup = id_lookup
        self.clock = clock
        self.sleep = sleep
        self._client = None
        self._instance: Optional[str] = None
        self._group: Optional[str] = None
        self._in_standby = False
        # exit() has work: this object sent EnterStandby, or found the instance (entering) Standby.
        self._owed = False

    @property
    def in_standby(self) -> bool:
        """True from an enter() that returned True until an exit() that returned True."""
        return self._in_standby

    def enter(self, reason: str, timeout: float = 120.0, every: float = 2.0) -> bool:
        """Moves the instance into Standby and waits (up to TIMEOUT, looking every EVERY seconds)
        until Auto Scaling says it is there. Returns True when it is (already was, too)."""
        return self._move("enter", timeout, every, reason=reason)

    def exit(self, timeout: float = 120.0, every: float = 2.0) -> bool:
        """Moves the instance back InService when enter() put (or found) it in Standby, and waits
        until it is. Returns True when it is InService or there was nothing to undo."""
        if not self._owed:
            return True
        return self._move("exit", timeout, every)

    def _where(self):
        if self._client is None:
            from quay_bootstrap import aws_session

            self._client = aws_session.client("autoscaling", region_name=self.region)
        if not self._instance:
            self._instance = self._id_lookup()
        return self._client, self._instance

    def _lifecycle_state(self, client, instance: str) -> Optional[str]:
        found = client.describe_auto_scaling_instances(
            InstanceIds=[instance]).get("AutoScalingInstances", [])
        if not found:
            return None
        self._group = found[0]["AutoScalingGroupName"]
        return found[0]["LifecycleState"]

    def _call(self, goal: str, client, instance: str) -> None:
        if goal == "exit":
            client.exit_standby(InstanceIds=[instance], AutoScalingGroupName=self._group)
            return
        # Decrement: otherwise the group, one InService instance short of its desired capacity,
        # launches a replacement, which outlives this short stop (and is scaled in after).
        client.enter_standby(InstanceIds=[instance], AutoScalingGroupName=self._group,
                             ShouldDecrementDesiredCapacity=True)
        self._owed = True

    def _move(self, goal: str, timeout: float, every: float, **fields) -> bool:
        began = self.clock()
        called = False
        state: Optional[str] = None
        error: Optional[str] = None
        while True:
            try:
                client, instance = self._where()
                if not instance:
                    return self._failed(goal, "no_instance_id", fields)
                state = self._lifecycle_state(client, instance)
                step = standby_step(goal, state, called)
                if goal == "enter" and state in ("EnteringStandby", "Standby"):
                    self._owed = True
                if step == CALL:
                    self._call(goal, client, instance)
                    called = True
                    continue
                if step == DONE:
                    return self._done(goal, called, self.clock() - began, fields)
                if step == FAIL:
                    return self._failed(goal, "not_in_group" if state is None else "wrong_state",
                                        fields, state=state)
            except Exception as err:  # noqa: BLE001 - AWS's errors never stop a planned stop
                retry, problem = standby_error(error_code(err))
                error = str(err)
                if not retry:
                    return self._failed(goal, problem, fields, state=state, error=error)
                log.debug("standby.retrying", action=goal, error=error)
            if self.clock() - began >= timeout:
                return self._failed(goal, "timeout", fields, state=state, error=error,
                                    timeout=timeout)
            self.sleep(every)

    def _done(self, goal: str, called: bool, waited: float, fields) -> bool:
        where = {"instance": self._instance, "group": self._group, "waited": round(waited, 1),
                 "already": not called, **fields}
        if goal == "enter":
            self._in_standby = True
            log.info("standby.entered", **where)
        else:
            self._in_standby = self._owed = False
            log.info("standby.exited", **where)
        return True

    def _failed(self, goal: str, problem: str, fields, **more) -> bool:
        log.warning("standby.failed", action=goal, problem=problem, instance=self._instance,
                    group=self._group, hint=STANDBY_HINTS[problem], **fields, **more)
        return False
