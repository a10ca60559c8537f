"""The roll of one node as an explicit state machine, pure: `step(state, event)` returns the next
state and what the shell (rollout.Roll) must do next. No I/O here; every wait happens in the
shell, and every wait is followed by fresh facts before anything is applied.

    Planning --Gathered--> Done(unchanged | skipped | rejected | backing off)
        |                  Gating (a new image: the canary record read, not written)
        |                     | Verdict(stop) --> Done(stopped)
        |                     | Verdict(wait): waits, then Planning again (fresh facts)
        |                     v Verdict(free | go)
        +-------------> Leasing --LeaseTaken--> Confirming --Gathered(same target)--+
                                                    | Gathered(anything else): the    |
                                                    v lease goes back, planned again  |
                                                 Planning                             |
                             Claiming <--(a new image: claim the canary, or "go")-----+
                                | Verdict(wait): the lease goes back, waits, Planning
                                v Verdict(canary | go)         (the same image: at once)
    Replacing <-----------------+---------------------------------------------------+
    Replacing --Started--> Verifying --Health(ok)--> Done(applied)
                              | Health(failed, the database migrated past it meanwhile by
                              | another node): Done(superseded), judged by nothing
                              | Health(failed): a canary that may have migrated is Held (for a
                              | failure of its own) or left to the watch (a shared cause)
                              v otherwise
                           RollingBack --RolledBack--> Done(rolled back), blamed by `blame`

A stack version (or a stack and image pair) is rejected only with evidence: the same image and
entry point failed with it and were healthy again with the previous stack at once (`blame`).
An image is judged by its canary only; a shared cause (the previous stack fails as well) judges
nothing and is retried after a backoff.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple, Union

# Blame for a failed roll.
STACK, IMAGE, BOTH, ENTRY_POINT, SHARED, THIS_NODE, SUPERSEDED = (
    "stack", "image", "stack and image", "entry point", "shared", "this node",
    "the database moved on")
BACKOFF_FIRST, BACKOFF_MAX = 120.0, 3600.0
# A Done result: a new image waits while Quay's /health/endtoend says a shared service is down.
WAITING_SHARED = "waiting: shared services down"
# A stack whose Quay failed only on shared services (the database, redis, storage) while the
# previous one was healthy again: a wrong DB_URI, or an outage that ended in between. Rejected
# only at this many such failures in a row, a backoff apart.
SHARED_STRIKES = 2


@dataclass(frozen=True)
class Target:
    """What the node should run, made from fresh facts: a stack version, an image, an entry
    point and the container's spec hash."""

    version: str
    image: str
    tag: str
    entry: str
    spec_hash: str

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.version, self.image, self.spec_hash)


def target_of(spec) -> Target:
    """The target a container spec (container.build_spec, with its entry point) stands for."""
    from quay_bootstrap.container import IMAGE_DIGEST, IMAGE_TAG, SPEC_HASH, STACK_VERSION

    return Target(spec.labels[STACK_VERSION], spec.labels[IMAGE_DIGEST],
                  spec.labels.get(IMAGE_TAG, ""),
                  "registry-nomigrate" if spec.command else "registry", spec.labels[SPEC_HASH])


@dataclass(frozen=True)
class Facts:
    """What the shell read just now: the target made from the source, what the node runs,
    what reconciling would do, and this node's memory of failed targets."""

    target: Target
    running: Target
    action: str  # container.decide: adopt, replace, create, start, refuse
    only_entry_point: bool = False  # replacing would change only the entry point
    rejected: bool = False
    backoff_until: float = 0.0
    now: float = 0.0
    failures: int = 0  # this target's failures so far that rejected nothing
    # Quay's /health/endtoend answered 503 with shared services false (read for a new image).
    shared_down: bool = False

    @property
    def new_image(self) -> bool:
        return self.target.image != self.running.image

    @property
    def waits_for_shared(self) -> bool:
        """A new image (a migration, a canary) waits while the shared services are down; a
        change of the stack or the container goes ahead: it may be the fix for the outage."""
        return self.shared_down and self.new_image


# --- states -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Planning:
    waited: bool = False  # a wait came before: the facts to come are the fresh ones


@dataclass(frozen=True)
class Gating:
    target: Target


@dataclass(frozen=True)
class Leasing:
    target: Target


@dataclass(frozen=True)
class Confirming:
    """The lease is taken: the facts are read again before anything is applied."""

    target: Target


@dataclass(frozen=True)
class Claiming:
    """A new image, under a lease: this node claims the canary, or goes on its verdict. Only
    a node holding a lease claims, so a claim never waits for a slot held by a held node."""

    target: Target
    previous: Target
    failures: int = 0


@dataclass(frozen=True)
class Replacing:
    target: Target
    previous: Target
    canary: bool
    failures: int = 0


@dataclass(frozen=True)
class Verifying:
    target: Target
    previous: Target
    canary: bool
    failures: int = 0


@dataclass(frozen=True)
class RollingBack:
    target: Target
    previous: Target
    canary: bool
    error: str
    shared_only: bool = False  # only shared services failed
    failures: int = 0


@dataclass(frozen=True)
class Held:
    """Terminal: a canary failed after its migration; its node stays out of service, its lease
    taken, until a later change applies."""

    target: Target
    error: str


@dataclass(frozen=True)
class Done:
    """Terminal. `reject`: the key this node will not try again until the source changes;
    `backoff`: when a target that failed without evidence is tried again; `verdict`: the
    canary's verdict to record; `pending`: a canary whose verdict the watch gives."""

    # unchanged, skipped, rejected, backing off, stopped, applied, rolled back, superseded,
    # WAITING_SHARED
    result: str
    target: Optional[Target] = None
    behind: bool = False
    reject: Optional[Tuple[str, str, str]] = None
    blame: Optional[str] = None
    verdict: Optional[str] = None
    pending: bool = False
    error: str = ""


State = Union[Planning, Gating, Leasing, Confirming, Claiming, Replacing, Verifying,
              RollingBack, Held, Done]


# --- events -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gathered:
    facts: Facts


@dataclass(frozen=True)
class Verdict:
    answer: str  # canary, go, stop, wait; free (nobody's canary yet: claimable)


@dataclass(frozen=True)
class LeaseTaken:
    pass


@dataclass(frozen=True)
class Started:
    pass


@dataclass(frozen=True)
class Health:
    ok: bool
    error: str = ""
    failing: FrozenSet[str] = frozenset()  # the services the probe said false
    migrated: bool = False  # a failed canary's start may have migrated (canary.migrated_in)
    # Another node migrated the database past this target while it started: its failure says
    # nothing about it, and nothing older may start with `registry` now.
    superseded: bool = False


@dataclass(frozen=True)
class RolledBack:
    ok: bool


Event = Union[Gathered, Verdict, LeaseTaken, Started, Health, RolledBack]


# --- what the shell does next -------------------------------------------------------------------
GATHER, PEEK, WAIT_FOR_VERDICT, ACQUIRE, RELEASE_AND_GATHER, CLAIM, RELEASE_AND_WAIT, REPLACE, \
    WAIT_HEALTHY, ROLL_BACK, FINISH = (
        "gather", "peek", "wait for the verdict", "acquire", "release, gather", "claim",
        "release, wait for the verdict", "replace", "wait healthy", "roll back", "finish")


class BadTransition(AssertionError):
    """An event the state cannot take: a bug in the shell, never a condition of the world."""


def start() -> Tuple[State, str]:
    return Planning(), GATHER


def step(state: State, event: Event, shared_services: FrozenSet[str] = frozenset()
         ) -> Tuple[State, str]:
    """The one dispatcher: each state names the events it takes."""
    if isinstance(state, Planning) and isinstance(event, Gathered):
        return _plan(event.facts)
    if isinstance(state, Gating) and isinstance(event, Verdict):
        if event.answer == "stop":
            return Done("stopped", state.target, reject=state.target.key, blame=IMAGE), FINISH
        if event.answer == "wait":  # another node's canary: decided again after the wait
            return Planning(waited=True), WAIT_FOR_VERDICT
        return Leasing(state.target), ACQUIRE
    if isinstance(state, Leasing) and isinstance(event, LeaseTaken):
        return Confirming(state.target), GATHER
    if isinstance(state, Confirming) and isinstance(event, Gathered):
        facts = event.facts
        if facts.target != state.target or facts.action != "replace" or facts.rejected or \
                facts.only_entry_point or facts.backoff_until > facts.now or \
                facts.waits_for_shared:
            return Planning(waited=True), RELEASE_AND_GATHER  # the world moved while it waited
        if facts.new_image:
            return Claiming(state.target, facts.running, facts.failures), CLAIM
        return Replacing(state.target, facts.running, False, facts.failures), REPLACE
    if isinstance(state, Claiming) and isinstance(event, Verdict):
        if event.answer == "stop":
            return Done("stopped", state.target, reject=state.target.key, blame=IMAGE), FINISH
        if event.answer in ("wait", "free"):
            return Planning(waited=True), RELEASE_AND_WAIT
        return Replacing(state.target, state.previous, event.answer == "canary",
                         state.failures), REPLACE
    if isinstance(state, Replacing) and isinstance(event, Started):
        return Verifying(state.target, state.previous, state.canary, state.failures), WAIT_HEALTHY
    if isinstance(state, Verifying) and isinstance(event, Health):
        return _verified(state, event, shared_services)
    if isinstance(state, RollingBack) and isinstance(event, RolledBack):
        who = blame(state.target, state.previous, state.canary, event.ok)
        if who == STACK and state.shared_only and state.failures + 1 < SHARED_STRIKES:
            who = SHARED  # not yet: the same again after a backoff is the evidence
        verdict = "failed-before-migrating" if who == IMAGE else (
            "open" if state.canary else None)  # unjudged: the next node to start it goes first
        return Done("rolled back", state.target, error=state.error, blame=who, verdict=verdict,
                    reject=state.target.key if who in (STACK, IMAGE, BOTH) else None), FINISH
    raise BadTransition(f"{type(state).__name__} cannot take {event!r}")


def _plan(facts: Facts) -> Tuple[State, str]:
    target = facts.target
    if facts.action == "adopt":
        return Done("unchanged", target), FINISH
    if facts.action == "replace" and facts.only_entry_point:
        return Done("unchanged", target, behind=True), FINISH  # serving, behind the database
    if facts.action != "replace":  # missing, stopped or not ours: the watchdog's business
        return Done("skipped", target), FINISH
    if facts.rejected:
        return Done("rejected", target), FINISH
    if facts.backoff_until > facts.now:
        return Done("backing off", target), FINISH
    if facts.waits_for_shared:
        return Done(WAITING_SHARED, target), FINISH
    if facts.new_image:
        return Gating(target), PEEK
    return Leasing(target), ACQUIRE


def _verified(state: Verifying, health: Health, shared_services: FrozenSet[str]
              ) -> Tuple[State, str]:
    if health.ok:
        return Done("applied", state.target, verdict="healthy" if state.canary else None), FINISH
    if health.superseded:  # kept as it is: the watch restarts it without migrating
        return Done("superseded", state.target, blame=SUPERSEDED, error=health.error), FINISH
    if state.canary and health.migrated:
        if health.failing and health.failing <= shared_services:
            # Only what every node shares failed: the new Quay stays, unjudged; the watch gives
            # the verdict once the shared services answer (node.Node.first_verdict).
            return Done("applied", state.target, pending=True, blame=SHARED,
                        error=health.error), FINISH
        return Held(state.target, health.error), FINISH
    shared_only = bool(health.failing) and health.failing <= shared_services
    return RollingBack(state.target, state.previous, state.canary, health.error, shared_only,
                       state.failures), ROLL_BACK


def blame(target: Target, previous: Target, canary: bool, previous_healthy: bool) -> str:
    """Who a failed roll is blamed on, from evidence: the previous container came back healthy
    at once (else a shared cause: nothing is judged), and what differs between the two."""
    if not previous_healthy:
        return SHARED
    if target.image != previous.image:
        if not canary:
            return THIS_NODE  # a healthy canary proved the image elsewhere
        # Both changed: this pair is not tried here again, but the image is not judged.
        return IMAGE if target.version == previous.version else BOTH
    if target.entry != previous.entry:
        return ENTRY_POINT
    return STACK


def backoff(failures: int) -> float:
    """Seconds before a target that failed `failures` times without evidence is tried again."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** max(0, failures - 1))


def terminal(state: State) -> bool:
    return isinstance(state, (Done, Held))
