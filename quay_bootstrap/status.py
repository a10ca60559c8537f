"""What the agent tells the world about this node: the status board (persisted to the state file,
served by endpoint.py) and systemd's sd_notify."""
from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

import structlog

from quay_bootstrap.paths import make_dirs

log = structlog.get_logger(__name__)

# Root reads it (`quay-bootstrap status`); a monitoring group may be given read access.
STATE_MODE = 0o640


class Board:
    """What the agent knows, shared by the loop (writer) and the endpoint (reader)."""

    def __init__(self, state_file: Optional[Path] = None,
                 redact: Optional[Callable[[Any, str], Any]] = None,
                 clock: Callable[[], float] = time.time) -> None:
        """Args:
            state_file: where every change is persisted (0640), for `status` when the agent is
                down.
            redact: masks secrets in a field's value (the log Redactor's `redact`): what the
                board holds reaches /status, /metrics and the state file, so it is masked once,
                on the way in, like a log line.
        """
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self._lock = threading.Lock()
        self._clock = clock  # wall-clock: `since` is compared with other nodes' and the LB's
        self._status: Dict[str, Any] = {"state": "starting", "since": clock(),
                                        "marked_unhealthy": False}
        self.state_file = state_file
        self._redact = redact
        self.registry = CollectorRegistry()
        self.m_state = Gauge("quay_bootstrap_state", "1 for the current state", ["state"],
                             registry=self.registry)
        self.m_restarts = Counter("quay_bootstrap_restarts", "Container restarts (ours and "
                                  "Docker's)", registry=self.registry)
        self.m_failures = Gauge("quay_bootstrap_consecutive_failures",
                                "Consecutive failed health probes", registry=self.registry)
        self.m_marked = Gauge("quay_bootstrap_marked_unhealthy",
                              "1 while the instance is marked unhealthy", registry=self.registry)
        self.m_probe = Histogram("quay_bootstrap_probe_seconds", "Health probe latency",
                                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.m_rollbacks = Counter("quay_bootstrap_rollbacks", "Changes rolled back because Quay "
                                   "was not healthy on them", registry=self.registry)
        self.m_thread_restarts = Counter("quay_bootstrap_thread_restarts", "Agent threads "
                                         "(probe, docker-events, lifecycle) restarted after they "
                                         "died", ["thread"], registry=self.registry)
        self.m_roll = Gauge("quay_bootstrap_roll", "1 for what this node's roll waits for, or why "
                            "the source's change is not applied here (none: converged)",
                            ["state"], registry=self.registry)
        self.m_endtoend = Gauge("quay_bootstrap_endtoend_up", "Quay's /health/endtoend (the "
                                "shared services) at its last reading before a new image "
                                "rolls: 1 answered 200", registry=self.registry)
        self.m_info = Gauge("quay_bootstrap_info", "The live stack version and image digest",
                            ["stack_version", "image_digest"], registry=self.registry)

    def update(self, **fields: Any) -> None:
        if self._redact:
            fields = {key: self._redact(value, key) for key, value in fields.items()}
        with self._lock:
            if "state" in fields and fields["state"] != self._status.get("state"):
                fields.setdefault("since", self._clock())
                for name in ("starting", "healthy", "failing", "shared-outage"):
                    self.m_state.labels(name).set(1 if name == fields["state"] else 0)
            if "stack_version" in fields or "image_digest" in fields:
                self.m_info.clear()
                merged = {**self._status, **fields}
                self.m_info.labels(merged.get("stack_version", ""),
                                   merged.get("image_digest", "")).set(1)
            if "marked_unhealthy" in fields:
                self.m_marked.set(1 if fields["marked_unhealthy"] else 0)
            if "consecutive_failures" in fields:
                self.m_failures.set(fields["consecutive_failures"])
            self._status.update(fields)
            # Under the lock: two writers must not interleave their snapshots.
            self._persist(dict(self._status))

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return dict(self._status)

    def _persist(self, snapshot: Dict[str, Any]) -> None:
        if not self.state_file:
            return
        try:
            make_dirs(self.state_file.parent)
            tmp = self.state_file.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, STATE_MODE)
            os.fchmod(fd, STATE_MODE)  # whatever the umask, and over an older 0644 file
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(snapshot, default=str))
            os.replace(tmp, self.state_file)
        except OSError as err:
            log.warning("status.persist_failed", path=str(self.state_file), error=str(err))


def read_previous(state_file: Optional[Path]) -> Dict[str, Any]:
    """What the previous run of the agent last wrote to the state file ({} when nothing)."""
    if not state_file:
        return {}
    try:
        with open(state_file, encoding="utf-8") as handle:
            found = json.load(handle)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


class Systemd:
    """sd_notify; a silent no-op outside systemd (no NOTIFY_SOCKET). STATUS= lines (shown by
    `systemctl status`) go through `redact`, like a log line."""

    def __init__(self, environ=os.environ, redact: Optional[Callable[[str], str]] = None) -> None:
        self.redact = redact or (lambda text: text)
        self.enabled = bool(environ.get("NOTIFY_SOCKET"))
        usec = environ.get("WATCHDOG_USEC", "")
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 else None

    def notify(self, *lines: str) -> None:
        if not self.enabled:
            return
        from systemd import daemon

        daemon.notify("\n".join(self.redact(line) for line in lines))

    @contextlib.contextmanager
    def keepalive(self) -> Iterator[None]:
        """Keep systemd's watchdog fed while the loop does something long (a pass, a restart
        with its stop timeout); each of those is bounded by its own deadline."""
        done = threading.Event()
        if self.watchdog_every:
            threading.Thread(target=self._ping_until, args=(done,), daemon=True).start()
        try:
            yield
        finally:
            done.set()

    def _ping_until(self, done: threading.Event) -> None:
        while not done.wait(self.watchdog_every):
            self.notify("WATCHDOG=1")


def publish(board: Board, systemd: Systemd, state, before=None, probed: bool = True) -> None:
    """The watchdog's state on the board and in systemd's status line, after a probe or when
    it changed from `before`."""
    watched = ("phase", "failures", "marked", "restarts")
    if not probed and before is not None and \
            all(getattr(state, f) == getattr(before, f) for f in watched):
        return
    probe = state.last_probe
    fields = {"ready_carried_until": None} if probed else {}  # this agent's own verdict now
    board.update(
        state=state.phase, consecutive_failures=state.failures,
        restarts_in_window=len(state.restarts), backoff_seconds=state.backoff,
        last_probe=None if probe is None else {
            "ok": probe.ok, "status": probe.status, "error": probe.error,
            "services": dict(probe.services), "at": time.time()}, **fields)
    line = f"STATUS={state.phase}"
    if probe is not None and not probe.ok:
        line += f": {probe.error}"
    systemd.notify(line)
