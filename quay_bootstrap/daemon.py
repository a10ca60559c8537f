"""The daemon loop (`quay-bootstrap run`): one pass, then watch Quay and hand each decision to its
owner until SIGTERM, which leaves Quay running."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable, Optional

import structlog

from quay_bootstrap import status, watchdog
from quay_bootstrap.config import Config
from quay_bootstrap.endpoint import Endpoint, inherited_socket
from quay_bootstrap.engine import Resume
from quay_bootstrap.errors import Interrupted
from quay_bootstrap.node import Node, RollOutcome
from quay_bootstrap.node_record import NodeRecorder
from quay_bootstrap.periodic import Periodic
from quay_bootstrap.pipeline import Live, Pass
from quay_bootstrap.supervise import CHECK_THREADS_EVERY, Supervisor

log = structlog.get_logger(__name__)

# Everything the loop hears arrives on one queue: probe results, Docker events, signals, the
# outcome of a roll.
_STOP = object()
_RELOAD = object()
_TERMINATE = object()
# The longest a restarted agent's first pass may answer /ready with the previous run's verdict
# (a fetch retrying against a slow store); the pass's own deadlines end it sooner.
FIRST_PASS_CARRY = 600.0



class Daemon:
    """Args: the agent config; `make_pass(cfg, sleep)` for a pipeline Pass; the stop event the
    signal handlers set; how to re-read the config on SIGHUP; a clock; the log redactor's
    `redact`, which the board applies to what /status and the state file show. The collaborators
    (board, systemd, escalation, roll, spawn) default to the real ones; tests replace them."""

    def __init__(self, cfg: Config, make_pass: Callable[..., Pass], stop: threading.Event, *,
                 reload_config: Optional[Callable[[], Config]] = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, board=None, systemd=None,
                 escalation=None, roll=None, spawn: Optional[Callable] = None,
                 redact: Optional[Callable] = None, recorder=None) -> None:
        from quay_bootstrap import health, stores
        from quay_bootstrap.aws import node_id
        from quay_bootstrap.escalation import Escalation, targets_from_config
        from quay_bootstrap.rollout import Roll

        self.first_cfg, self.make_pass, self.stop, self.clock = cfg, make_pass, stop, clock
        self.wall = wall
        self.watched = None  # engine.Resume: where Docker's events are told from
        self.reload_config = reload_config
        self.events: "queue.SimpleQueue" = queue.SimpleQueue()  # put() is signal-safe
        self.systemd = systemd or status.Systemd(redact=redact)
        # What the previous run last said, read before this run's board overwrites it.
        self.previous = status.read_previous(cfg.report.state_file) if board is None else {}
        self.board = board or status.Board(cfg.report.state_file, redact)
        self.escalation = escalation or Escalation(lambda: targets_from_config(self.cfg, redact),
                                                   self.board.update)
        self.prober = health.Prober(lambda: (self.cfg, self.live.health_url), self.events.put, stop,
                                    observe=self.board.m_probe.observe, clock=clock)
        self.node = Node(roll or Roll(stores.open_leases, node_id(cfg), self._sleep), self.board,
                         self.systemd, self.feed, self._wake, clock,
                         spawn or (lambda fn: _thread("roll", fn)), self.events.put)
        self.state = watchdog.State()
        self.lifecycle = None
        self.draining = self.reload_pending = False
        self.refresh = Periodic("refresh.failed", lambda: self._roll(self.cfg, "refresh"),
                                cfg.stack.refresh_interval, jitter=0.2, clock=clock)
        self.ping = Periodic("systemd.ping_failed", lambda: self.systemd.notify("WATCHDOG=1"),
                             self.systemd.watchdog_every, first=0, clock=clock)
        self.threads = Supervisor(stop, clock, self.board.m_thread_restarts)
        self.check_threads = Periodic("agent.thread_check_failed", self.threads.check,
                                      CHECK_THREADS_EVERY, clock=clock)
        # This node's record beside the leases, for `quay-bootstrap cluster` (node_record.py).
        self.recorder = recorder or NodeRecorder(self._put_record, self.node.roll.me)

    @property
    def live(self) -> Optional[Live]:
        return self.node.live

    @property
    def cfg(self) -> Config:
        return self.node.live.cfg if self.node.live else self.first_cfg

    @property
    def held(self) -> Optional[str]:
        return self.node.held

    def request_stop(self) -> None:
        self.stop.set()
        self.node.stopping.set()
        self.prober.wake.set()
        self.events.put(_STOP)

    def request_reload(self) -> None:
        self.events.put(_RELOAD)

    def run(self) -> int:
        self.systemd.notify("STATUS=starting: fetching conf/stack and starting Quay")
        self._carry_over()
        # Listening before the first pass: a load balancer's checks of /ready are answered
        # through an agent restart (drain.carried), and /status shows the first pass. On
        # systemd's socket (quay-bootstrap.socket) the checks made while no agent runs wait.
        listen = self.cfg.report.listen
        endpoint = Endpoint(self.board, listen, sock=inherited_socket(listen)).start()
        log.info("agent.listening", address=endpoint.address)
        try:
            try:
                with self.systemd.keepalive():  # errors here are start-up errors: the CLI's
                    self._first_pass()
            except Interrupted:
                log.info("agent.stopped", during="the first pass")
                return 0
            if self._carried_now():
                # Until the first probe, which comes now; not the Quay it was about: none.
                same = self.live.container_id == self.previous.get("container_id")
                self.board.update(ready_carried_until=time.time() + self._carry_limit()
                                  if same else None)
            # From now on, so a crash before the events stream connects is still told.
            self.watched = Resume(self.wall())
            self._start_threads()
            try:
                while not self.stop.is_set() and self.handle(self._next_item()):
                    self.tend()
            finally:
                self.systemd.notify("STOPPING=1", "STATUS=stopping; Quay keeps running")
                if self.node.rolling:  # never leave a replacement half-done
                    log.info("agent.finishing_roll")
                    while self.node.rolling and not self._settle(timeout=90):
                        pass
                log.info("agent.stopped", container=self.cfg.container.name,
                         note="the Quay container was left running")
        finally:
            endpoint.stop()
            self.node.balancer.close()
        return 0

    def _carry_over(self) -> None:
        """/ready answers as the previous run last did while this one has not probed yet, when
        that verdict is recent and healthy (drain.carried)."""
        from quay_bootstrap.drain import carried

        if carried(self.previous, time.time(), self._carry_limit()) is not None:
            # For the whole first pass (a slow fetch must not flip every node of an agent
            # upgrade to 503 at once), then the limit again once it adopted the same Quay.
            self.board.update(ready_carried_until=time.time() + FIRST_PASS_CARRY)

    def _carry_limit(self) -> float:
        return 2 * self.cfg.health.interval + 5

    def _carried_now(self) -> bool:
        return self.board.snapshot().get("ready_carried_until") is not None

    def _start_threads(self) -> None:
        """The loop's long-lived threads; `tend` restarts one that dies."""
        self.threads.start("probe", self.prober.run)
        self.threads.start("docker-events", self._watch_docker)
        if self.cfg.report.lifecycle:
            from quay_bootstrap.aws import Lifecycle

            self.lifecycle = Lifecycle(self.cfg.report.lifecycle, self.cfg.stack.region, self.clock)
            # Returns once it has told (or when there is no termination hook): done, not dead.
            self.threads.start("lifecycle", lambda: self.lifecycle.watch_termination(
                self.stop, lambda: self.events.put(_TERMINATE)), finishes=True)

    def tend(self) -> None:
        """At each turn of the loop: feed systemd's watchdog; restart a thread that died; write
        this node's record when it changed (or every 5 minutes)."""
        self.ping.run_if_due()
        self.check_threads.run_if_due()
        self.recorder.tend(self.board.snapshot())

    def _put_record(self, key: str, data: bytes) -> None:
        from quay_bootstrap.stores.put import uploader

        uploader(self.node.roll.leases_for(self.cfg.stack))(key, data)

    def handle(self, item) -> bool:
        """One thing the loop heard; False to stop."""
        if item is _STOP:
            return False
        if item is _RELOAD:
            self._reload()
        elif item is _TERMINATE:
            self._drain()
        elif isinstance(item, RollOutcome):
            self.node.finish_roll(item)
            if self.reload_pending:
                self._reload()
        elif not self.draining:
            # A held node is out of service, and a roll replacing Quay owns its events.
            if not (self.node.held or self.node.replacing.is_set()):
                self.feed(item if item is not None else watchdog.Tick(self.clock()))
            if self.lifecycle:  # Pending:Wait until Quay is healthy
                self.lifecycle.launch_tick(self.state.phase == "healthy",
                                           self.cfg.health.start_period)
            self.refresh.run_if_due()
        return True

    def _settle(self, timeout: float) -> bool:
        """At exit: the next thing heard, until the roll's outcome (True) or `timeout` (True)."""
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            return True
        if isinstance(item, RollOutcome):
            self.node.finish_roll(item)
            return True
        return False

    def _next_item(self):
        due = [at - self.clock() for at in (self.state.restart_due_at(), self.refresh.due_at)
               if at is not None]
        try:
            return self.events.get(timeout=max(0.0, min([0.5, *due])))
        except queue.Empty:
            return None

    def feed(self, seen) -> None:
        """One observation through the watchdog; its actions go to their owners."""
        before = self.state
        self.state, actions = watchdog.step(self.state, seen,
                                            watchdog.Policy.from_config(self.cfg))
        for action in actions:
            self._do(action)
        if self.state.phase == "healthy":
            self.node.healthy(probed=isinstance(seen, watchdog.Probed))
        self.node.first_verdict(self.state.phase)
        self.prober.follow(self.state, self.cfg.health.start_period, self.clock())
        status.publish(self.board, self.systemd, self.state, before,
                       isinstance(seen, watchdog.Probed))

    def _do(self, action) -> None:
        if isinstance(action, watchdog.Log):
            getattr(log, action.level)(action.event, **dict(action.fields),
                                       services=self.state.services())
        elif isinstance(action, watchdog.Restart):
            self.node.restart(action, self.state)
        elif isinstance(action, watchdog.MarkUnhealthy) and self.state.marked:
            self.escalation.mark(action.reason)  # unless its restart waits for the budget
        elif isinstance(action, watchdog.ClearUnhealthy):
            self.escalation.clear()
        elif isinstance(action, watchdog.Ready):
            self.systemd.notify("READY=1")
        elif isinstance(action, watchdog.MarkKnownGood):
            self.node.store.mark_known_good(self.live.stack_version)

    def _wake(self) -> None:
        self.prober.fast.set()
        self.prober.wake.set()

    def _first_pass(self) -> None:
        if self.node.first_pass(self.make_pass(self.cfg, self._sleep)):
            self.refresh.due_at = self.clock()  # adopted as it runs: rolled within the budget

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted()

    def _reload(self) -> None:
        if self.node.rolling:  # after the roll in progress: a SIGHUP is never lost
            self.reload_pending = True
            log.info("agent.reload_queued", why="SIGHUP", note="after the roll in progress")
            return
        self.reload_pending = False
        log.info("agent.reload", why="SIGHUP")
        try:
            cfg = self.reload_config() if self.reload_config else self.cfg
        except Exception as err:  # noqa: BLE001 - a bad config must not end the watch over Quay
            log.error("agent.reload_failed", error=str(err),
                      note="still watching the Quay that runs, with the previous config")
            return
        self._roll(cfg, "SIGHUP")

    def _roll(self, cfg: Config, why: str) -> None:
        self.node.start_roll(lambda c: self.make_pass(c, self._sleep), cfg, why)

    def _drain(self) -> None:
        """The instance is leaving: stop Quay gracefully, say CONTINUE, and restart nothing."""
        self.draining = True
        self.refresh.cancel()
        self.board.update(state="terminating")
        self.systemd.notify("STATUS=terminating: Quay stopped for the Auto Scaling group")
        self.feed(watchdog.Expect(self.clock(), float("inf"), everything=True))
        with self.systemd.keepalive():
            self.node.drain(lambda: self.node.docker.stop_quay(self.live.spec), self.lifecycle)

    def _watch_docker(self) -> None:
        self.node.docker.watch(self.cfg.container.name, self.stop, self.docker_event,
                               self.watched)

    def docker_event(self, action: str, code: Optional[int], when: Optional[float]) -> None:
        """One of Docker's events for Quay, on the loop's queue, dated when Docker says it
        happened (watchdog.event_at)."""
        at = watchdog.event_at(self.clock(), self.wall(), when)
        self.events.put(watchdog.from_docker(action, code, at))


def _thread(name: str, target: Callable[[], None]) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()
