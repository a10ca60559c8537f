"""Each node's status record beside the leases (`<stack.source>.rollout/nodes/<node>.json`), so
`quay-bootstrap cluster` can show the whole cluster from the object store alone.

A record is written when what it says changes (state, stack, image, held, degraded, draining,
last change) and otherwise at most every EVERY seconds, so a node that has gone silent is seen
as stale after STALE_AFTER. Steady state: one small PUT per node per 5 minutes. `record` and
`due` are pure; `NodeRecorder` writes off the loop's thread and never raises.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Dict, Optional

import structlog

log = structlog.get_logger(__name__)

EVERY = 300.0
STALE_AFTER = 3 * EVERY
RETRY = 60.0  # seconds after a failed write before the next try
PREFIX = "nodes/"
# What the cluster view shows of a node's /status (secrets are masked on the board already).
FIELDS = ("state", "stack_version", "image_digest", "entry_point", "container", "held",
          "degraded", "draining", "marked_unhealthy", "last_change", "not_applied", "roll")


def key(me: str) -> str:
    return f"{PREFIX}{me}.json"


def record(snapshot: Dict[str, Any], me: str, now: float) -> Dict[str, Any]:
    """The record of a board snapshot: who, when, and FIELDS that are set."""
    return {"node": me, "at": now,
            **{name: snapshot[name] for name in FIELDS if snapshot.get(name) is not None}}


def due(last: Optional[Dict[str, Any]], new: Dict[str, Any], now: float,
        every: float = EVERY) -> bool:
    """Whether NEW must be written: nothing written yet, anything but the time changed, or the
    last write is EVERY seconds old."""
    if last is None:
        return True
    if {k: v for k, v in last.items() if k != "at"} != {k: v for k, v in new.items() if k != "at"}:
        return True
    return now - last["at"] >= every


class NodeRecorder:
    """Args: `put(key, data)` on the lease store (stores/put.py, opened lazily by the caller);
    this node's name; a wall clock; `spawn(fn)` runs a write off the caller's thread."""

    def __init__(self, put: Callable[[str, bytes], None], me: str,
                 clock: Callable[[], float] = time.time,
                 spawn: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
        self.put, self.me, self.clock = put, me, clock
        self.spawn = spawn or (lambda fn: threading.Thread(target=fn, name="node-record",
                                                           daemon=True).start())
        self.last: Optional[Dict[str, Any]] = None
        self.writes = 0
        self._busy = False
        self._failing: Optional[str] = None
        self._retry_at = 0.0

    def tend(self, snapshot: Dict[str, Any]) -> None:
        """Called each turn of the loop: writes the record when it is due (one write at a
        time; a change made during a write is written at the next turn)."""
        new = record(snapshot, self.me, self.clock())
        if self._busy or new["at"] < self._retry_at or not due(self.last, new, new["at"]):
            return
        self._busy = True
        self.spawn(lambda: self._write(new))

    def _write(self, new: Dict[str, Any]) -> None:
        try:
            self.put(key(self.me), json.dumps(new, sort_keys=True, default=str).encode())
            self.last, self.writes = new, self.writes + 1
            if self._failing is not None:
                log.info("node_record.written_again", node=self.me)
                self._failing = None
        except Exception as err:  # noqa: BLE001 - the cluster view is a report: never fatal
            kind = type(err).__name__
            if kind != self._failing:  # once per kind of failure, not every turn
                log.warning("node_record.failed", error=str(err), node=self.me,
                            hint="`quay-bootstrap cluster` shows this node as stale until a "
                                 "write succeeds; check write access to <source>.rollout/nodes/")
                self._failing = kind
            self._retry_at = new["at"] + RETRY  # not every turn of the loop
        finally:
            self._busy = False
