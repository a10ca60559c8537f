"""Standby's decisions from tables: what to do given the instance's LifecycleState, which AWS
errors are worth another try, and that every failure carries a hint."""
from __future__ import annotations

import pytest

from quay_bootstrap.aws import (
    CALL,
    DONE,
    FAIL,
    STANDBY_HINTS,
    WAIT,
    error_code,
    standby_error,
    standby_step,
)

# (goal, LifecycleState (None: in no group), already called, next step)
STEPS = [
    ("enter", "InService", False, CALL),
    ("enter", "InService", True, WAIT),  # AWS has not caught up with the call yet
    ("enter", "EnteringStandby", False, WAIT),  # someone else's, or ours from a timed-out try
    ("enter", "EnteringStandby", True, WAIT),
    ("enter", "Standby", False, DONE),  # already there: remembered, exit() undoes it
    ("enter", "Standby", True, DONE),
    ("enter", None, False, FAIL),  # in no group
    ("enter", "Pending", False, FAIL),
    ("enter", "Pending:Wait", False, FAIL),  # launch hook not answered yet
    ("enter", "Terminating:Wait", False, FAIL),
    ("enter", "Terminating", True, FAIL),  # the group took it away meanwhile
    ("enter", "Detaching", False, FAIL),
    ("enter", "Warmed:Running", False, FAIL),
    ("exit", "Standby", False, CALL),
    ("exit", "Standby", True, WAIT),
    ("exit", "EnteringStandby", False, WAIT),  # an enter still draining: ExitStandby after it
    ("exit", "Pending", True, WAIT),
    ("exit", "Pending:Wait", True, WAIT),  # a launch hook holds it until it is completed
    ("exit", "Pending:Proceed", True, WAIT),
    ("exit", "Pending", False, WAIT),  # someone else moved it back already
    ("exit", "InService", True, DONE),
    ("exit", "InService", False, DONE),  # never sends ExitStandby for an InService instance
    ("exit", None, False, FAIL),
    ("exit", "Terminating", False, FAIL),
    ("exit", "Detached", True, FAIL),
]


@pytest.mark.parametrize("goal,state,called,expected", STEPS)
def test_step(goal, state, called, expected):
    assert standby_step(goal, state, called) == expected


def test_each_call_is_sent_at_most_once_per_attempt():
    states = [None, "InService", "EnteringStandby", "Standby", "Pending", "Pending:Wait",
              "Pending:Proceed", "Terminating", "Detaching"]
    for goal in ("enter", "exit"):
        assert all(standby_step(goal, state, True) != CALL for state in states)


# (error code or botocore exception class name, retry, problem)
ERRORS = [
    ("AccessDenied", False, "access_denied"),
    ("AccessDeniedException", False, "access_denied"),
    ("UnauthorizedOperation", False, "access_denied"),
    ("NoCredentialsError", False, "access_denied"),
    ("ExpiredToken", False, "access_denied"),
    ("ValidationError", False, "rejected"),  # below MinSize, or not InService / not Standby
    ("ResourceContention", True, "unavailable"),
    ("Throttling", True, "unavailable"),
    ("ServiceUnavailable", True, "unavailable"),
    ("InternalFailure", True, "unavailable"),
    ("EndpointConnectionError", True, "unavailable"),
    ("ReadTimeoutError", True, "unavailable"),
    ("NoRegionError", False, "error"),
    ("SomethingNew", False, "error"),
]


@pytest.mark.parametrize("code,retry,problem", ERRORS)
def test_error(code, retry, problem):
    assert standby_error(code) == (retry, problem)


def test_every_problem_has_a_hint():
    problems = {problem for _, _, problem in ERRORS} | {
        "no_instance_id", "not_in_group", "wrong_state", "timeout"}
    assert problems == set(STANDBY_HINTS)


@pytest.mark.parametrize("problem", ["not_in_group", "access_denied", "error"])
def test_hints_that_may_be_about_permissions_name_the_iam_actions(problem):
    for action in ("autoscaling:EnterStandby", "autoscaling:ExitStandby",
                   "autoscaling:DescribeAutoScalingInstances"):
        assert action in STANDBY_HINTS[problem]


class ClientError(Exception):
    """Shaped as botocore's: the code is in response["Error"]["Code"]."""

    def __init__(self, code):
        super().__init__(code)
        self.response = {"Error": {"Code": code, "Message": "..."}}


class EndpointConnectionError(Exception):
    pass


@pytest.mark.parametrize("err,code", [
    (ClientError("AccessDenied"), "AccessDenied"),
    (EndpointConnectionError("refused"), "EndpointConnectionError"),
    (ValueError("x"), "ValueError"),
])
def test_error_code(err, code):
    assert error_code(err) == code
