"""What a roll did (`Rolled`), as the node, the board and the log take it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import structlog

from quay_bootstrap.errors import ContainerError

if TYPE_CHECKING:
    from quay_bootstrap.budget import Lease
    from quay_bootstrap.config import Config
    from quay_bootstrap.pipeline import Live, Pass
    from quay_bootstrap.roll_states import Target

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Rolled:
    """What a roll did. `live` is what the node runs afterwards when the container changed
    (applied, or rolled back); `cfg` the config to watch with from now on, when it changed."""

    # unchanged, skipped, rejected, stopped, applied, rolled back, held,
    # roll_states.WAITING_SHARED
    result: str
    live: Optional[Live] = None
    cfg: Optional[Config] = None
    change: Optional[Dict[str, str]] = None  # for the status board's last_change
    # Logged by the daemon once the board shows the change, so what the log says is already
    # what /status says: (level, event, fields).
    event: Optional[Tuple[str, str, Dict[str, object]]] = None
    # The shared database was migrated past the image this node runs: it keeps running, but
    # must not be restarted with the migrating entry point.
    behind: bool = False
    # A first start that is the canary: (verdicts, image, tag), judged by the watch.
    canary: Optional[tuple] = None
    # The slot a node keeps while it is out of service: held, or rolled back to a Quay that is
    # not healthy either (released once it is: node.Node.healthy).
    lease: Optional[Lease] = None

    def report(self, board, held: Optional[str] = None) -> Optional[str]:
        """On the status board first, then in the log, so what the log says /status says.
        A held node is out of service (/healthz 503, the watchdog paused) until a later change
        applies; a node behind the database is degraded until it is rolled forward. Returns
        why the node is held, if it still is."""
        if self.result == "held" or (held and self.result == "applied"):
            held = self.change["reason"] if self.result == "held" else None
            board.update(marked_unhealthy=bool(held), marked_reason=held,
                         **({"state": "held"} if held else {}))
        if self.behind:
            board.update(degraded="the shared database was migrated by a newer Quay: this node "
                                  "restarts without migrating until it is rolled forward")
        if self.result == "rolled back":
            board.m_rollbacks.inc()
        if self.change:
            board.update(last_change=self.change)
        if self.event:
            level, event, fields = self.event
            getattr(log, level)(event, **fields)
        return held


def canary_failed(cfg, image: str) -> ContainerError:
    return ContainerError(f"the cluster's canary failed on {image}, so it is not started here",
                          where=cfg.image.lock or "image.reference",
                          hint="Fix the image or the stack, then change the lock (or "
                               "image.reference) again")


@dataclass
class Run:
    """What one roll learnt so far (the shell's scratch; the machine's state is elsewhere)."""

    one: "Pass"
    live: "Live"
    why: str
    spec: object = None
    target: Optional["Target"] = None
    reason: str = ""
    action: str = ""
    container_id: str = ""
    probe: object = None
    back_spec: object = None
    back_ok: bool = True  # the previous Quay was healthy again after a roll back
    waited: bool = False
