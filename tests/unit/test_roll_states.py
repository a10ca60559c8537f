"""The roll's state machine (roll_states.step), from tables: each row a state, what happened, and
the state and next act it must lead to. No I/O, no fakes."""
from __future__ import annotations

import pytest

from quay_bootstrap import roll_states as rs
from quay_bootstrap.roll_states import (
    Claiming,
    Confirming,
    Done,
    Facts,
    Gathered,
    Gating,
    Health,
    Held,
    LeaseTaken,
    Leasing,
    Planning,
    RolledBack,
    RollingBack,
    Started,
    Target,
    Verdict,
    Verifying,
)

OLD = Target("stack-1", "sha256:old", "v3.9.0", "registry", "spec-1")
STACK = Target("stack-2", "sha256:old", "v3.9.0", "registry", "spec-2")  # a new stack only
IMAGE = Target("stack-1", "sha256:new", "v3.10.0", "registry", "spec-3")  # a new image only
BOTH = Target("stack-2", "sha256:new", "v3.10.0", "registry", "spec-4")
BEHIND = Target("stack-2", "sha256:old", "v3.9.0", "registry-nomigrate", "spec-5")
SHARED = frozenset({"database", "redis", "storage"})


def facts(target=STACK, action="replace", **kw) -> Facts:
    return Facts(target, OLD, action, **{"now": 100.0, **kw})


@pytest.mark.parametrize("seen, state, todo", [
    (facts(action="adopt"), Done("unchanged", STACK), rs.FINISH),
    (facts(BEHIND, only_entry_point=True), Done("unchanged", BEHIND, behind=True), rs.FINISH),
    (facts(action="create"), Done("skipped", STACK), rs.FINISH),  # the watchdog's business
    (facts(action="start"), Done("skipped", STACK), rs.FINISH),
    (facts(rejected=True), Done("rejected", STACK), rs.FINISH),
    (facts(backoff_until=160.0), Done("backing off", STACK), rs.FINISH),
    (facts(backoff_until=90.0), Leasing(STACK), rs.ACQUIRE),  # the backoff is over
    (facts(), Leasing(STACK), rs.ACQUIRE),  # a stack change needs no canary
    (facts(IMAGE), Gating(IMAGE), rs.PEEK),  # a new image: the canary record first
    (facts(IMAGE, shared_down=True), Done(rs.WAITING_SHARED, IMAGE), rs.FINISH),
    (facts(BOTH, shared_down=True), Done(rs.WAITING_SHARED, BOTH), rs.FINISH),
    (facts(shared_down=True), Leasing(STACK), rs.ACQUIRE),  # a stack change may be the fix
], ids=["unchanged", "behind", "missing", "stopped", "rejected", "backing-off", "backoff-over",
        "new-stack", "new-image", "image-waits-for-shared", "both-wait-for-shared",
        "stack-rolls-in-outage"])
def test_planning_from_fresh_facts(seen, state, todo):
    assert rs.step(Planning(), Gathered(seen)) == (state, todo)


@pytest.mark.parametrize("state, answer, after, todo", [
    (Gating(IMAGE), "stop", Done("stopped", IMAGE, reject=IMAGE.key, blame=rs.IMAGE), rs.FINISH),
    (Gating(IMAGE), "wait", Planning(waited=True), rs.WAIT_FOR_VERDICT),
    (Gating(IMAGE), "free", Leasing(IMAGE), rs.ACQUIRE),
    (Gating(IMAGE), "go", Leasing(IMAGE), rs.ACQUIRE),
    (Claiming(IMAGE, OLD), "canary", rs.Replacing(IMAGE, OLD, True), rs.REPLACE),
    (Claiming(IMAGE, OLD), "go", rs.Replacing(IMAGE, OLD, False), rs.REPLACE),
    # Another node claimed it between the peek and the claim: the lease goes back first.
    (Claiming(IMAGE, OLD), "wait", Planning(waited=True), rs.RELEASE_AND_WAIT),
    (Claiming(IMAGE, OLD), "stop", Done("stopped", IMAGE, reject=IMAGE.key, blame=rs.IMAGE),
     rs.FINISH),
])
def test_the_canary_record_decides_a_new_image(state, answer, after, todo):
    assert rs.step(state, Verdict(answer)) == (after, todo)


def test_a_lease_is_followed_by_fresh_facts_before_anything_is_applied():
    assert rs.step(Leasing(STACK), LeaseTaken()) == (Confirming(STACK), rs.GATHER)


@pytest.mark.parametrize("seen, after, todo", [
    (facts(), rs.Replacing(STACK, OLD, False), rs.REPLACE),  # nothing moved: applied
    (facts(IMAGE), Planning(waited=True), rs.RELEASE_AND_GATHER),  # the lock moved on
    (facts(BEHIND), Planning(waited=True), rs.RELEASE_AND_GATHER),  # the database moved on
    (facts(action="adopt"), Planning(waited=True), rs.RELEASE_AND_GATHER),  # someone did it
    (facts(rejected=True), Planning(waited=True), rs.RELEASE_AND_GATHER),
    (facts(backoff_until=200.0), Planning(waited=True), rs.RELEASE_AND_GATHER),
    (facts(shared_down=True), rs.Replacing(STACK, OLD, False), rs.REPLACE),  # may be the fix
], ids=["same", "new-lock", "database-moved", "already-there", "rejected", "backing-off",
        "stack-in-outage"])
def test_a_plan_that_the_world_outran_during_the_wait_is_dropped(seen, after, todo):
    assert rs.step(Confirming(STACK), Gathered(seen)) == (after, todo)


def test_a_new_image_whose_shared_services_went_down_during_the_wait_is_dropped():
    seen = facts(IMAGE, shared_down=True)
    assert rs.step(Confirming(IMAGE), Gathered(seen)) == (Planning(waited=True),
                                                         rs.RELEASE_AND_GATHER)
    assert rs.step(Planning(waited=True), Gathered(seen)) == (Done(rs.WAITING_SHARED, IMAGE),
                                                              rs.FINISH)


def test_a_new_image_under_a_lease_claims_the_canary():
    assert rs.step(Confirming(IMAGE), Gathered(facts(IMAGE))) == (Claiming(IMAGE, OLD), rs.CLAIM)


@pytest.mark.parametrize("canary, health, after", [
    (False, Health(True), Done("applied", STACK)),
    (True, Health(True), Done("applied", STACK, verdict="healthy")),
    (True, Health(False, "db", frozenset({"database"}), migrated=True),
     Done("applied", STACK, pending=True, blame=rs.SHARED, error="db")),  # judged by the watch
    (True, Health(False, "web", frozenset({"web_gunicorn"}), migrated=True), Held(STACK, "web")),
    (True, Health(False, "web", frozenset({"web_gunicorn"}), migrated=False),
     RollingBack(STACK, OLD, True, "web")),
    (False, Health(False, "db", frozenset({"database"}), migrated=False),
     RollingBack(STACK, OLD, False, "db", shared_only=True)),
], ids=["applied", "canary-healthy", "canary-shared-outage", "canary-held", "canary-back",
        "back"])
def test_what_health_says_after_the_start(canary, health, after):
    state = rs.step(rs.Replacing(STACK, OLD, canary), Started())
    assert state == (Verifying(STACK, OLD, canary), rs.WAIT_HEALTHY)
    assert rs.step(state[0], health, SHARED)[0] == after


@pytest.mark.parametrize("target, canary, previous_healthy, who, reject, verdict", [
    (STACK, False, True, rs.STACK, True, None),  # the same image and entry point: the stack
    (STACK, False, False, rs.SHARED, False, None),  # the old stack fails too: a shared cause
    (IMAGE, True, True, rs.IMAGE, True, "failed-before-migrating"),  # the canary judges it
    (IMAGE, False, True, rs.THIS_NODE, False, None),  # a canary was healthy with it
    (BOTH, True, True, rs.BOTH, True, "open"),  # the pair, not the image
    (IMAGE, True, False, rs.SHARED, False, "open"),
    (BEHIND, False, True, rs.ENTRY_POINT, False, None),
])
def test_blame_needs_evidence(target, canary, previous_healthy, who, reject, verdict):
    done, todo = rs.step(RollingBack(target, OLD, canary, "error"), RolledBack(previous_healthy))
    assert todo == rs.FINISH and done.result == "rolled back"
    assert (done.blame, done.reject, done.verdict) == (who, target.key if reject else None,
                                                       verdict)


@pytest.mark.parametrize("failures, who, reject", [
    (0, rs.SHARED, False),  # an outage that ended in between looks the same: tried again
    (1, rs.STACK, True),  # the second time in a row, a backoff apart: the stack (a DB_URI)
])
def test_a_stack_failing_only_on_shared_services_is_rejected_at_the_second_strike(
        failures, who, reject):
    state = RollingBack(STACK, OLD, False, "db", shared_only=True, failures=failures)
    done, _ = rs.step(state, RolledBack(True))
    assert (done.blame, done.reject) == (who, STACK.key if reject else None)


@pytest.mark.parametrize("state, event", [
    (Planning(), LeaseTaken()),
    (Leasing(STACK), Gathered(facts())),
    (Confirming(STACK), Started()),
    (Verifying(STACK, OLD, False), RolledBack(True)),
    (Done("applied"), Gathered(facts())),
])
def test_an_event_a_state_cannot_take_is_a_bug_said_loudly(state, event):
    with pytest.raises(rs.BadTransition):
        rs.step(state, event)


@pytest.mark.parametrize("failures, seconds", [(1, 120.0), (2, 240.0), (5, 1920.0), (9, 3600.0)])
def test_backoff_doubles_to_an_hour(failures, seconds):
    assert rs.backoff(failures) == seconds


def test_a_start_the_database_outran_is_judged_by_nothing():
    """Another node's canary migrated the database past this target while it started."""
    state = Verifying(IMAGE, OLD, True)
    done, todo = rs.step(state, Health(False, "exited", frozenset({"web_gunicorn"}),
                                       superseded=True), SHARED)
    assert todo == rs.FINISH
    assert (done.result, done.reject, done.verdict, done.blame) == (
        "superseded", None, None, rs.SUPERSEDED)
