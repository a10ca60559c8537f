"""The daemon loop (`quay-bootstrap run`): one pass, then watch Quay and hand each decision to its
owner until SIGTERM, which leaves Quay running."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import replace
from typing import Callable, Optional

import structlog

from quay_bootstrap import status, watchdog
from quay_bootstrap.config import Config
from quay_bootstrap.container import IMAGE_DIGEST
from quay_bootstrap.errors import Interrupted
from quay_bootstrap.periodic import Periodic
from quay_bootstrap.pipeline import Live, Pass

log = structlog.get_logger(__name__)

# Everything the loop hears arrives on one queue: probe results, Docker events, signals.
_STOP = object()
_RELOAD = object()
_TERMINATE = object()
# Docker events that arrive within this long after a roll are the roll's own.
_ROLL_ECHO = 1.0


class Daemon:
    """Args: the agent config; `make_pass(cfg, sleep)` for a pipeline Pass; the stop event the
    signal handlers set; how to re-read the config on SIGHUP; a clock. The collaborators
    (board, systemd, escalation, roll) default to the real ones and are replaced in tests."""

    def __init__(self, cfg: Config, make_pass: Callable[..., Pass], stop: threading.Event, *,
                 reload_config: Optional[Callable[[], Config]] = None,
                 clock: Callable[[], float] = time.monotonic, board=None, systemd=None,
                 escalation=None, roll=None) -> None:
        from quay_bootstrap import health, stores
        from quay_bootstrap.aws import node_id
        from quay_bootstrap.escalation import Escalation, targets_from_config
        from quay_bootstrap.rollout import Roll

        self.cfg, self.make_pass, self.stop, self.clock = cfg, make_pass, stop, clock
        self.reload_config = reload_config
        self.events: "queue.SimpleQueue" = queue.SimpleQueue()  # put() is signal-safe
        self.systemd = systemd or status.Systemd()
        self.board = board or status.Board(cfg.report.state_file)
        self.escalation = escalation or Escalation(lambda: targets_from_config(self.cfg),
                                                   self.board.update)
        self.roll = roll or Roll(stores.open_leases, node_id(cfg), self._sleep)
        self.prober = health.Prober(lambda: (self.cfg, self.live.health_url), self.events.put, stop,
                                    observe=self.board.m_probe.observe, clock=clock)
        self.state = watchdog.State()
        self.policy = watchdog.Policy.from_config(cfg)
        self.live: Optional[Live] = None
        self.docker = self.store = self.lifecycle = self.held = None
        self.draining = False
        self.refresh = Periodic("refresh.failed", lambda: self._roll(self.cfg, "refresh"),
                                cfg.stack.refresh_interval, jitter=0.2, clock=clock)
        self.ping = Periodic("systemd.ping_failed", lambda: self.systemd.notify("WATCHDOG=1"),
                             self.systemd.watchdog_every, first=0, clock=clock)

    def request_stop(self) -> None:
        self.stop.set()
        self.prober.wake.set()
        self.events.put(_STOP)

    def request_reload(self) -> None:
        self.events.put(_RELOAD)

    def run(self) -> int:
        self.systemd.notify("STATUS=starting: fetching conf/stack and starting Quay")
        try:
            with self.systemd.keepalive():  # errors here are start-up errors: the CLI's to map
                self._first_pass()
        except Interrupted:
            log.info("agent.stopped", during="the first pass")
            return 0
        endpoint = status.Endpoint(self.board, self.cfg.report.listen).start()
        log.info("agent.listening", address=endpoint.address)
        _thread("probe", self.prober.run)
        _thread("docker-events", self._watch_docker)
        if self.cfg.report.lifecycle:
            from quay_bootstrap.aws import Lifecycle

            self.lifecycle = Lifecycle(self.cfg.report.lifecycle, self.cfg.stack.region, self.clock)
            _thread("lifecycle", lambda: self.lifecycle.watch_termination(
                self.stop, lambda: self.events.put(_TERMINATE)))
        try:
            while not self.stop.is_set():
                self.ping.run_if_due()
                item = self._next_item()
                if item is _STOP:
                    break
                if item is _RELOAD:
                    self._reload()
                elif item is _TERMINATE:
                    self._drain()
                elif not self.draining:
                    if not self.held:  # a held node is out of service: nothing to watch
                        self.feed(item if item is not None else watchdog.Tick(self.clock()))
                    if self.lifecycle:  # Pending:Wait until Quay is healthy
                        self.lifecycle.launch_tick(self.state.phase == "healthy",
                                                   self.cfg.health.start_period)
                    self.refresh.run_if_due()
        finally:
            self.systemd.notify("STOPPING=1", "STATUS=stopping; Quay keeps running")
            endpoint.stop()
            log.info("agent.stopped", container=self.cfg.container.name,
                     note="the Quay container was left running")
        return 0

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
        self.state, actions = watchdog.step(self.state, seen, self.policy)
        for action in actions:
            self._do(action)
        self.prober.follow(self.state, self.policy.start_period, self.clock())
        status.publish(self.board, self.systemd, self.state, before, isinstance(seen, watchdog.Probed))

    def _do(self, action) -> None:
        if isinstance(action, watchdog.Log):
            getattr(log, action.level)(action.event, **dict(action.fields),
                                       services=self.state.services())
        elif isinstance(action, watchdog.Restart):
            self._restart(action)
        elif isinstance(action, watchdog.MarkUnhealthy):
            self.escalation.mark(action.reason)
        elif isinstance(action, watchdog.ClearUnhealthy):
            self.escalation.clear()
        elif isinstance(action, watchdog.Ready):
            self.systemd.notify("READY=1")
        elif isinstance(action, watchdog.MarkKnownGood):
            self.store.mark_known_good(self.live.stack_version)

    def _restart(self, action: watchdog.Restart) -> None:
        self.board.m_restarts.inc()
        log.warning("container.restarting", reason=action.reason, next_backoff=self.state.backoff,
                    restarts_in_window=len(self.state.restarts), services=self.state.services())
        spec = self.roll.restart_spec(self.live)

        def expect(echoes) -> None:
            now = self.clock()
            self.feed(watchdog.Expect(now, now + spec.stop_timeout + 10, echoes))

        try:
            with self.systemd.keepalive():
                created = self.docker.restart_quay(spec, action.recreate or spec != self.live.spec,
                                                   action.exited, expect)
            if created:
                self.live = replace(self.live, spec=spec, container_id=created)
            self.prober.fast.set()
            self.prober.wake.set()
        except Exception as err:  # noqa: BLE001 - the loop must survive; the next tick retries
            self.feed(watchdog.RestartFailed(self.clock(), str(err), action))

    def _first_pass(self) -> None:
        one = self.make_pass(self.cfg, self._sleep)
        live, deferred, held = self.roll.first(one)
        self.docker, self.store = one.docker, one.store
        self._adopt(live, started_at=self.clock() - self.docker.age(live.container_id))
        if deferred:  # adopted as it runs: the change is rolled at once, within the budget
            self.refresh.due_at = self.clock()
        self._apply_rolled(held)

    def _adopt(self, live: Live, started_at: float) -> None:
        self.live, self.cfg = live, live.cfg
        self.policy = watchdog.Policy.from_config(live.cfg)
        now = self.clock()
        self.feed(watchdog.Applied(now, started_at, quiet_until=now + _ROLL_ECHO))
        self.board.update(state="starting", stack_version=live.stack_version,
                          image_digest=live.spec.labels[IMAGE_DIGEST],
                          container=live.cfg.container.name)
        self.prober.fast.set()
        self.prober.wake.set()

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted()

    def _reload(self) -> None:
        log.info("agent.reload", why="SIGHUP")
        try:
            cfg = self.reload_config() if self.reload_config else self.cfg
        except Exception as err:  # noqa: BLE001 - a bad config must not end the watch over Quay
            log.error("agent.reload_failed", error=str(err),
                      note="still watching the Quay that runs, with the previous config")
            return
        self._roll(cfg, "SIGHUP")

    def _roll(self, cfg: Config, why: str) -> None:
        touched = []  # events queued meanwhile are news unless the roll touched the container
        try:
            with self.systemd.keepalive():
                one = self.make_pass(cfg, self._sleep)
                rolled = self.roll.apply(one, self.live, why, lambda: touched.append(1))
        except Interrupted:
            return
        except Exception as err:  # noqa: BLE001 - a failed change must not end the watch
            log.error("rollout.failed", why=why, error=str(err),
                      note="still watching the Quay that runs")
            self.board.update(last_change={"why": why, "result": "failed", "error": str(err)})
            return
        finally:
            if touched:  # a replacement's die, destroy and start are the roll's own
                self.feed(watchdog.Expect(self.clock(), self.clock() + _ROLL_ECHO, everything=True))
        if rolled.live is not None:
            self.store = one.store
            self._adopt(rolled.live, started_at=self.clock())
        elif rolled.cfg is not None:
            self.cfg, self.policy = rolled.cfg, watchdog.Policy.from_config(rolled.cfg)
        self._apply_rolled(rolled)

    def _apply_rolled(self, rolled) -> None:
        if rolled.behind and not self.board.snapshot().get("degraded"):
            self.docker.leave_restarts_to_the_agent(self.live.container_id)
        self.held = rolled.report(self.board, self.held)

    def _drain(self) -> None:
        """The instance is leaving: stop Quay gracefully, say CONTINUE, and restart nothing."""
        self.draining = True
        self.refresh.cancel()
        self.board.update(state="terminating")
        self.systemd.notify("STATUS=terminating: Quay stopped for the Auto Scaling group")
        self.feed(watchdog.Expect(self.clock(), float("inf"), everything=True))
        with self.systemd.keepalive():
            self.lifecycle.drain(lambda: self.docker.stop_quay(self.live.spec))

    def _watch_docker(self) -> None:
        self.docker.watch(self.cfg.container.name, self.stop, lambda action, code: self.events.put(
            watchdog.from_docker(action, code, self.clock())))


def _thread(name: str, target: Callable[[], None]) -> None:
    threading.Thread(target=target, name=name, daemon=True).start()
