"""`run --once` (rollout.Roll.once): one pass, but as every start by the daemon."""
from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from quay_bootstrap import canary as canary_mod
from quay_bootstrap.container import IMAGE_DIGEST, IMAGE_TAG
from quay_bootstrap.errors import ContainerError
from quay_bootstrap.pipeline import Outcome
from quay_bootstrap.rolled import canary_failed

if TYPE_CHECKING:
    from quay_bootstrap.pipeline import Pass
    from quay_bootstrap.rollout import Roll

log = structlog.get_logger(__name__)


class _WaitForCanary(Exception):
    """Another node's canary was met before starting: the pass is made again after a wait."""

    def __init__(self, image: str) -> None:
        super().__init__(image)
        self.image = image


def run_once(roll: "Roll", one: "Pass") -> Outcome:
    """`run --once`: one pass, but as every start by the daemon: the entry point the shared
    database allows (an image older than the database's starts with `registry-nomigrate`,
    never into alembic's "Can't locate revision": exit 255 on real Quay, no Quay), through
    the canary gate (a version the canary failed is not started; one the cluster has not
    seen makes this node its canary, and the verdict is recorded), and the database record
    moved before a migrating start. A Quay that differs only by the entry point is kept."""
    cfg = one.cfg
    verdicts = roll.verdicts(cfg.stack)
    claimed = []
    away = []  # the records could not be read or written: a plain pass, as before them

    def records(call, *args):
        if away:
            return None
        try:
            return call(*args)
        except (ContainerError, _WaitForCanary):
            raise
        except Exception as err:  # noqa: BLE001 - any store fault: the records are away
            log.warning("rollout.records_unavailable", error=str(err),
                        note="run --once goes on without the canary and database records; "
                             "the daemon needs them (write access beside the stack)")
            away.append(err)
            return None

    def entry(base):
        spec = records(roll.entry, base, verdicts) or base
        if spec is not base and one.decide(base)[1].kind == "adopt":
            return base  # as Roll.apply: behind the database, but serving
        return spec

    def before_start(spec) -> None:
        records(gated, spec)

    def gated(spec) -> None:
        image, tag = spec.labels[IMAGE_DIGEST], spec.labels.get(IMAGE_TAG, "")
        verdict = verdicts.ask(image, tag, cfg.rollout.lease_ttl)
        if verdict == "stop":
            raise canary_failed(cfg, image)
        if verdict == "wait":
            raise _WaitForCanary(image)
        if verdict == "canary":
            claimed.append(spec)
        if not spec.command:
            verdicts.migrating(image, tag)

    waited = False
    while True:  # after another node's canary, the pass is made again from fresh facts
        try:
            outcome = one.run(entry=entry, before_start=before_start)
            break
        except _WaitForCanary as wait:
            if not waited:
                log.info("rollout.waiting_for_canary", image=wait.image,
                         canary=verdicts.waiting_for)
                waited = True
            roll.sleep(roll.poll)
            one.outcome = Outcome(healthy=False)
    for spec in claimed:
        image, tag = spec.labels[IMAGE_DIGEST], spec.labels.get(IMAGE_TAG, "")
        state = canary_mod.HEALTHY if outcome.healthy else (
            canary_mod.FAILED_AFTER if roll._migrated(one, spec, outcome.container_id)
            else canary_mod.FAILED_BEFORE)
        records(verdicts.finish, image, tag, state)
    return outcome
