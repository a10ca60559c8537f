"""The canary: one node starts a new Quay version against the shared database first, and its
verdict, kept in the object store beside the leases, decides for every node.

Quay migrates its database on every start of the `registry` entry point, with no lock and no
way back (quay-facts.md): an image older than the one that migrated cannot start with
`registry` again. So the store also remembers which image migrated the database last, and a
node that must start an older image uses `registry-nomigrate`.
"""
from __future__ import annotations

import json
import re
import time
from typing import Callable, Optional, Tuple

import structlog

from quay_bootstrap.budget import swap

log = structlog.get_logger(__name__)

UPGRADE = "upgrade"  # the canary record: {image, tag, canary, state, since}
DATABASE = "database"  # the image that last migrated the shared database: {image, tag, at}
MIGRATING, NOMIGRATE = "registry", "registry-nomigrate"
# Verdicts. A canary that failed before its migration step leaves the database as it was.
ROLLING, HEALTHY = "rolling", "healthy"
FAILED_BEFORE, FAILED_AFTER = "failed-before-migrating", "failed-after-migrating"
FAILED = (FAILED_BEFORE, FAILED_AFTER, "failed")  # "failed": an older agent's record
# A node's first start failed: no verdict on the version (the node may be at fault); the next
# node to start it is the canary.
OPEN = "open"
# Quay's init scripts that run before its migration, in quay-entrypoint.sh's order (a glob of
# conf/init/*.sh, each `"$f" || exit`): a start that ended in one of them left the database alone.
BEFORE_MIGRATION = ("certs_install.sh", "client_certs.sh", "copy_config_files.sh",
                    "d_validate_config_bundle.sh", "nginx_conf_create.sh")
_INIT_SCRIPT = re.compile(r"Running init script '(?:[^']*/)?([^/']+)'")
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)")


def version_of(tag: str) -> Optional[Tuple[int, int, int]]:
    match = _VERSION.match(tag or "")
    return tuple(int(part) for part in match.groups()) if match else None


def entry_point(image: str, tag: str, migrated: Optional[dict]) -> str:
    """`registry` unless the database was migrated by another image that is newer than this
    one (or not comparable with it): starting this one would then fail at the migration, or
    worse, so it starts without migrating."""
    if not migrated or migrated.get("image") == image:
        return MIGRATING
    ours, theirs = version_of(tag), version_of(str(migrated.get("tag", "")))
    if ours is not None and theirs is not None and ours >= theirs:
        return MIGRATING
    return NOMIGRATE


def migrated_in(logs: str, exited: bool) -> bool:
    """Whether a failed start may have migrated the shared database.

    Only a container that has exited (and that Docker will not start again), whose every
    init-script line (Quay's own, seen on real Quay; one run after another when Docker restarted
    it) names a script before runmigration.sh, certainly did not. Anything else counts as
    migrated: still running (it may be migrating now), a run that reached runmigration.sh, logs
    cut or lost, no init-script line at all. Rolling a migrated database's node back to the
    older image would leave it with no Quay; holding a node that did not migrate costs a slot.
    """
    if not exited:
        return True
    scripts = _INIT_SCRIPT.findall(logs)
    return not scripts or any(script not in BEFORE_MIGRATION for script in scripts)


class Verdicts:
    """The canary record and the database record in a lease store (stores.LeaseStore).

    Args:
        leases: the lease store beside the stack.
        me: this node's name.
        sleep: the daemon's stop-aware sleep (SIGTERM ends the wait for a verdict).
        clock: wall-clock seconds (records are compared across nodes).
    """

    def __init__(self, leases, me: str, sleep: Callable[[float], None],
                 clock: Callable[[], float] = time.time, poll: float = 2.0) -> None:
        self.leases, self.me, self.sleep, self.clock, self.poll = leases, me, sleep, clock, poll
        self.waiting_for: Optional[str] = None  # the canary `ask` last said to wait for

    def _read(self, key: str):
        got = self.leases.get(key)
        return (_json(got[0]) if got else None), got

    def migrated(self) -> Optional[dict]:
        return self._read(DATABASE)[0]

    def ask(self, image: str, tag: str, ttl: float, claim: bool = True) -> str:
        """Before this node starts `image` for the first time, once, without waiting: "canary"
        (this node goes first; the record says so), "go" (the canary was healthy), "stop" (it
        failed) or "wait" (another node's canary is rolling). A canary silent for `ttl` is
        taken over; a lost race for the record is asked again at once. Without `claim`, the
        record is only read, and "free" says this node could claim it."""
        while True:
            record, got = self._read(UPGRADE)
            now = self.clock()
            stale = record is not None and record.get("state") == ROLLING and \
                now - float(record.get("since", 0)) > ttl
            if record is None or record.get("image") != image or stale or \
                    record.get("state") == OPEN:
                if not claim:
                    return "free"
                if swap(self.leases, UPGRADE, got, self._body(image, tag, ROLLING)):
                    log.info("rollout.canary", image=image, node=self.me)
                    return "canary"
                continue
            state = record.get("state")
            if state == HEALTHY:
                return "go"
            if state in FAILED:
                log.error("rollout.stopped", image=image, canary=record.get("canary"),
                          verdict=state, note="the canary failed on this image; fix it and "
                                              "change the lock again")
                return "stop"
            if record.get("canary") == self.me:
                return "canary" if claim else "free"  # this agent restarted mid-upgrade
            self.waiting_for = record.get("canary")
            return "wait"

    def claimed(self, image: str) -> bool:
        """Whether this node is the rolling canary of `image` (its agent restarted mid-canary:
        the Quay it adopts still owes the cluster a verdict)."""
        record = self._read(UPGRADE)[0]
        return bool(record) and (record.get("image"), record.get("canary"),
                                 record.get("state")) == (image, self.me, ROLLING)

    def migrating(self, image: str, tag: str, attempts: int = 10) -> None:
        """Before this node starts `image` with the migrating entry point: the database record
        moves to it (never back to an older version), so no node starts an older image with
        `registry` afterwards, even if this agent dies before any verdict. A write lost to
        another node is read again, `attempts` times at most, a poll apart."""
        for attempt in range(attempts):
            record, got = self._read(DATABASE)
            if record and record.get("image") == image:
                return
            theirs, ours = version_of(str((record or {}).get("tag", ""))), version_of(tag)
            if record and theirs is not None and (ours is None or ours < theirs):
                return  # a newer one migrated already
            body = json.dumps({"image": image, "tag": tag, "by": self.me,
                               "at": self.clock()}).encode()
            if swap(self.leases, DATABASE, got, body):
                return
            if attempt + 1 < attempts:
                self.sleep(self.poll)
        raise RuntimeError(f"the database record beside the leases changed {attempts} times "
                           "while this node tried to write it; not started")

    def finish(self, image: str, tag: str, state: str) -> None:
        """The canary's verdict, only over this node's own claim of this image."""
        record, got = self._read(UPGRADE)
        if not record or (record.get("image"), record.get("canary")) != (image, self.me):
            log.warning("rollout.verdict_not_recorded", image=image, verdict=state,
                        record=record, why="another node claimed the canary meanwhile")
            return
        swap(self.leases, UPGRADE, got, self._body(image, tag, state))

    def _body(self, image: str, tag: str, state: str) -> bytes:
        return json.dumps({"image": image, "tag": tag, "canary": self.me, "state": state,
                           "since": self.clock()}).encode()


def _json(data: bytes):
    try:
        value = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
