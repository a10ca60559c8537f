"""The daemon loop (`quay-bootstrap run`): one pass, then watch Quay and act on the watchdog's
decisions until SIGTERM, which leaves Quay running."""
from __future__ import annotations

import contextlib
import datetime
import json
import queue
import random
import re
import socket
import threading
import time
from dataclasses import replace
from typing import Callable, Iterator

import structlog

from quay_bootstrap import health, report, rollout, watchdog
from quay_bootstrap.config import Config
from quay_bootstrap.container import IMAGE_DIGEST, MANAGED, SPEC_HASH, STACK_VERSION, decide
from quay_bootstrap.errors import Interrupted
from quay_bootstrap.pipeline import START_POLL, Pass

log = structlog.get_logger(__name__)

# Everything the loop hears arrives on one queue: probe results, Docker events, signals.
_STOP = object()
_RELOAD = object()
_TERMINATE = object()


class Daemon:
    """Args: the agent config; a factory `make_pass(cfg, sleep)` for a `Pass` (stack, lock,
    image, container); the shared stop event that signal handlers set; a clock."""

    def __init__(self, cfg: Config, make_pass: Callable[..., Pass],
                 stop: threading.Event, *, reload_config: Callable[[], Config] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.make_pass = make_pass
        self.stop = stop
        self.reload_config = reload_config
        self.clock = clock
        # SimpleQueue: its put() is safe to call from a signal handler.
        self.events: "queue.SimpleQueue" = queue.SimpleQueue()
        self.systemd = report.Systemd()
        self.board = report.Board(cfg.report.state_file)
        self.state = watchdog.State()
        self._fast_probe = threading.Event()
        self._fast_probe.set()
        self._probe_now = threading.Event()  # wakes the probe thread after a (re)start
        self._last_ping = 0.0
        # Docker events up to this time are echoes of our own restart (its die, destroy and
        # start), not news: counting them would double every restart.
        self._own_until = float("-inf")
        # Events our own restart will cause, each consumed once (kind, until when).
        self._echoes: list = []
        self._next_refresh: "float | None" = None
        self.rejected: set = set()  # (stack, image, spec) that rolled back: not retried
        self._lease_stores: dict = {}
        self.me = f"{socket.gethostname()}:{cfg.container.name}"
        self.lifecycle = None
        self.draining = False

    # --- signals: only set flags ------------------------------------------------------------
    def request_stop(self) -> None:
        self.stop.set()
        self._probe_now.set()
        self.events.put(_STOP)

    def request_reload(self) -> None:
        self.events.put(_RELOAD)

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        self.systemd.notify("STATUS=starting: fetching conf/stack and starting Quay")
        try:
            with self._busy():  # errors here are start-up errors: the CLI maps them to exits
                self._apply(self.cfg)
        except Interrupted:
            log.info("agent.stopped", during="the first pass")
            return 0
        endpoint = report.Endpoint(self.board, self.cfg.report.listen).start()
        log.info("agent.listening", address=endpoint.address)
        threading.Thread(target=self._probe_loop, name="probe", daemon=True).start()
        threading.Thread(target=self._event_loop, name="docker-events", daemon=True).start()
        if self.cfg.report.lifecycle:
            from quay_bootstrap.lifecycle import Lifecycle

            self.lifecycle = Lifecycle(self.cfg.report.lifecycle, self.cfg.stack.region or None)
            self._first_start = self.clock()
            if self.cfg.report.lifecycle.termination_hook:
                threading.Thread(target=self._termination_watch, name="lifecycle",
                                 daemon=True).start()
        self._schedule_refresh()
        try:
            while not self.stop.is_set():
                self._ping_watchdog()
                item = self._next_item()
                if item is _STOP:
                    break
                if item is _RELOAD:
                    self._reload()
                    continue
                if item is _TERMINATE:
                    self._drain()
                    continue
                if self.draining:
                    continue
                self._feed(item if item is not None else watchdog.Tick(self.clock()))
                self._launch_hook()
                if self._next_refresh is not None and self.clock() >= self._next_refresh:
                    self._refresh()
        finally:
            self.systemd.notify("STOPPING=1", "STATUS=stopping; Quay keeps running")
            endpoint.stop()
            log.info("agent.stopped", container=self.cfg.container.name,
                     note="the Quay container was left running")
        return 0

    def _next_item(self):
        timeout = 0.5
        for due in (self.state.restart_due_at(), self._next_refresh):
            if due is not None:
                timeout = max(0.0, min(timeout, due - self.clock()))
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _feed(self, seen) -> None:
        if isinstance(seen, (watchdog.Died, watchdog.Started, watchdog.Missing)):
            if seen.at <= self._own_until or self._is_echo(seen):
                return
        before = self.state
        self.state, actions = watchdog.step(self.state, seen, self.policy)
        for action in actions:
            self._do(action)
        # Fast probes only while Quay may still be coming up, to see "ready" at once; after
        # its start period, failures are counted at the configured pace.
        if self.state.phase == "starting" and \
                self.clock() - self.state.started_at < self.policy.start_period:
            self._fast_probe.set()
        else:
            self._fast_probe.clear()
        if (self.state.phase, self.state.failures, self.state.marked, len(self.state.restarts)) \
                != (before.phase, before.failures, before.marked, len(before.restarts)) \
                or isinstance(seen, watchdog.Probed):
            self._publish(seen)

    def _do(self, action) -> None:
        if isinstance(action, watchdog.Log):
            getattr(log, action.level)(action.event, **dict(action.fields),
                                       services=self._services())
        elif isinstance(action, watchdog.Restart):
            self._restart(action)
        elif isinstance(action, watchdog.MarkUnhealthy):
            log.error("instance.marking_unhealthy", reason=action.reason)
            self.board.update(marked_unhealthy=True, marked_reason=action.reason)
            threading.Thread(target=self._escalate, args=(action.reason,), name="escalate",
                             daemon=True).start()
        elif isinstance(action, watchdog.ClearUnhealthy):
            log.info("instance.recovered")
            self.board.update(marked_unhealthy=False, marked_reason=None)
        elif isinstance(action, watchdog.Ready):
            self.systemd.notify("READY=1")
        if isinstance(action, watchdog.Log) and action.event == "health.healthy":
            # Quay answered healthy on this stack: it is the one to go back to.
            self.store.mark_known_good(self.stack_version)

    def _restart(self, action: watchdog.Restart) -> None:
        self.board.m_restarts.inc()
        log.warning("container.restarting", reason=action.reason,
                    next_backoff=self.state.backoff, restarts_in_window=len(self.state.restarts),
                    services=self._services())
        try:
            with self._busy():
                self._restart_container(action)
            self._fast_probe.set()
            self._probe_now.set()
        except Exception as err:  # noqa: BLE001 - the loop must survive; the next tick retries
            log.error("container.restart_failed", error=str(err))
            self.state = replace(self.state, pending=action.reason)

    def _expect(self, *kinds: str) -> None:
        until = self.clock() + self.spec.stop_timeout + 10
        self._echoes.extend((kind, until) for kind in kinds)

    def _is_echo(self, seen) -> bool:
        """Consume one expected echo of our own restart; a real crash right after it is not
        one of them and still counts."""
        kind = {watchdog.Died: "die", watchdog.Started: "start",
                watchdog.Missing: "destroy"}[type(seen)]
        self._echoes = [(k, until) for k, until in self._echoes if until >= seen.at]
        for index, (expected, _) in enumerate(self._echoes):
            if expected == kind:
                del self._echoes[index]
                return True
        return False

    def _restart_container(self, action: watchdog.Restart) -> None:
        found = self.docker.find(self.spec.name)
        if found is not None and found.labels.get(MANAGED) != "true":
            log.error("container.not_ours", name=self.spec.name,
                      hint="a container quay-bootstrap did not create took Quay's name; it is "
                           "left alone. Remove it, then restart quay-bootstrap")
            return
        if found is None or action.recreate:
            if found is not None:
                self._expect(*(("die", "destroy") if found.status == "running" else ("destroy",)))
                self.docker.remove(found.id)
            self._expect("start")
            self.container_id = self.docker.create_and_start(self.spec)
        elif found.status == "running" and action.reason.startswith("the container exited"):
            # Docker's restart policy already brought it back: restarting again would double it.
            log.info("container.restarted_by_docker", name=self.spec.name)
        elif found.status in ("running", "restarting", "paused"):
            self._expect("die", "start")
            self.docker.client.api.restart(found.id, timeout=self.spec.stop_timeout)
        else:
            self._expect("start")
            self.docker.start(found.id)

    def _escalate(self, reason: str) -> None:
        try:
            asg = report.AutoScaling(self.cfg.report.autoscaling,
                                     self.cfg.stack.region or None)
            self.board.update(autoscaling_marked=asg.mark_unhealthy(reason))
        except Exception as err:  # noqa: BLE001 - reporting must not kill the loop
            log.error("autoscaling.failed", error=str(err))
        report.run_command(self.cfg.report.on_unhealthy, reason)

    def _publish(self, seen) -> None:
        probe = self.state.last_probe
        self.board.update(
            state=self.state.phase, consecutive_failures=self.state.failures,
            restarts_in_window=len(self.state.restarts), backoff_seconds=self.state.backoff,
            last_probe=None if probe is None else {
                "ok": probe.ok, "status": probe.status, "error": probe.error,
                "services": dict(probe.services)})
        line = f"STATUS={self.state.phase}"
        if probe is not None and not probe.ok:
            line += f": {probe.error}"
        self.systemd.notify(line)

    def _services(self):
        probe = self.state.last_probe
        return dict(probe.services) if probe else {}

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """Keep systemd's watchdog fed while the loop does something long (a pass, a restart
        with its stop timeout); each of those is bounded by its own deadline."""
        done = threading.Event()
        if self.systemd.watchdog_every:
            threading.Thread(target=self._ping_until, args=(done,), daemon=True).start()
        try:
            yield
        finally:
            done.set()

    def _ping_until(self, done: threading.Event) -> None:
        while not done.wait(self.systemd.watchdog_every):
            self.systemd.notify("WATCHDOG=1")

    def _ping_watchdog(self) -> None:
        every = self.systemd.watchdog_every
        now = self.clock()
        if every and now - self._last_ping >= every:
            self.systemd.notify("WATCHDOG=1")
            self._last_ping = now

    # --- applying the config ----------------------------------------------------------------
    def _apply(self, cfg: Config) -> None:
        """One pass with `cfg`; the daemon adopts `cfg` only when the pass succeeded."""
        one = self.make_pass(cfg, self._sleep)
        outcome = one.run(wait_for_health=False)
        self.cfg = cfg
        self.docker, self.spec, self.store = one.docker, one.spec, one.store
        self.container_id = outcome.container_id
        self.stack_version = outcome.stack_version
        self.policy = watchdog.Policy.from_config(cfg)
        started = _started_at(self.docker, outcome.container_id, self.clock)
        self.state = replace(self.state, started_at=started, phase="starting", since=self.clock(),
                             container_up=True, successes=0, failures=0, pending=None)
        self.board.update(state="starting", stack_version=outcome.stack_version,
                          image_digest=outcome.image_digest, container=cfg.container.name)

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise Interrupted()

    # --- lifecycle hooks -------------------------------------------------------------------
    def _launch_hook(self) -> None:
        """Hold the instance in Pending:Wait until Quay is healthy (heartbeats), then let it in."""
        hooks = self.lifecycle
        if hooks is None or hooks.launch_finished:
            return
        try:
            with self._busy():
                if self.state.phase == "healthy":
                    hooks.launch_done(True)
                elif self.clock() - self._first_start > self.cfg.health.start_period:
                    log.error("lifecycle.abandon", reason="Quay was not healthy within "
                              f"start_period ({self.cfg.health.start_period:g}s)")
                    hooks.launch_done(False)
                else:
                    hooks.launch_heartbeat()
        except Exception as err:  # noqa: BLE001 - retried on the next tick
            log.warning("lifecycle.failed", error=str(err))

    def _termination_watch(self) -> None:
        while not self.stop.wait(5.0):
            try:
                if self.lifecycle.termination_requested():
                    self.events.put(_TERMINATE)
                    return
            except Exception as err:  # noqa: BLE001 - keep watching
                log.warning("lifecycle.poll_failed", error=str(err))

    def _drain(self) -> None:
        """The instance is leaving: stop Quay gracefully, say CONTINUE, and restart nothing."""
        self.draining = True
        self._next_refresh = None
        self.board.update(state="terminating")
        self.systemd.notify("STATUS=terminating: Quay stopped for the Auto Scaling group")
        log.warning("lifecycle.terminating", container=self.spec.name,
                    stop_timeout=self.spec.stop_timeout)
        self._own_until = float("inf")
        try:
            with self._busy():
                found = self.docker.find(self.spec.name)
                if found is not None and found.labels.get(MANAGED) == "true":
                    self.docker.stop(found.id, self.spec.stop_timeout)
                self.lifecycle.termination_done()
        except Exception as err:  # noqa: BLE001 - the group's timeout still ends it
            log.error("lifecycle.drain_failed", error=str(err))

    def _schedule_refresh(self) -> None:
        interval = self.cfg.stack.refresh_interval
        # Jitter, so a cluster's nodes do not all ask the store in the same second.
        self._next_refresh = (self.clock() + interval * random.uniform(0.8, 1.2)
                              if interval > 0 else None)

    def _refresh(self) -> None:
        try:
            self._roll(self.cfg, "refresh")
        finally:
            self._schedule_refresh()

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
        """Apply a changed stack, image or spec to this node within the cluster's budget:
        everything fetched and pulled first, then a lease, then stop + start, then healthy
        within start_period or back to the previous stack and image."""
        self._own_until = float("inf")  # a replacement's die/destroy/start are ours
        try:
            with self._busy():
                self._roll_inner(cfg, why)
        except Interrupted:
            return
        except Exception as err:  # noqa: BLE001 - a failed change must not end the watch
            log.error("rollout.failed", why=why, error=str(err),
                      note="still watching the Quay that runs")
            self.board.update(last_change={"why": why, "result": "failed", "error": str(err)})
        finally:
            self._own_until = self.clock() + 1.0

    def _roll_inner(self, cfg: Config, why: str) -> None:
        one = self.make_pass(cfg, self._sleep)
        spec = one.prepare()  # fetched, validated, pulled: Quay is untouched so far
        found = one.docker.find(spec.name)
        action = decide(found, spec, cfg.container.adopt_unmanaged)
        key = (spec.labels[STACK_VERSION], spec.labels[IMAGE_DIGEST], spec.labels[SPEC_HASH])
        if action.kind == "adopt":
            self.cfg, self.policy = cfg, watchdog.Policy.from_config(cfg)
            log.debug("rollout.unchanged", why=why)
            return
        if action.kind != "replace":  # missing, stopped or not ours: the watchdog's business
            log.info("rollout.skipped", why=why, action=action.kind, reason=action.reason)
            return
        old_spec, old_version = self.spec, self.stack_version
        if key in self.rejected:
            one.store.switch_current(old_version)
            log.debug("rollout.still_rejected", version=key[0][:12], image=key[1])
            return
        where = (cfg.stack.source, cfg.stack.endpoint_url, cfg.stack.region)
        if where not in self._lease_stores:
            self._lease_stores[where] = rollout.open_store(cfg.stack)
        leases = self._lease_stores[where]
        canary = None
        if spec.labels[IMAGE_DIGEST] != old_spec.labels[IMAGE_DIGEST]:
            canary = self._canary_gate(leases, spec.labels[IMAGE_DIGEST], cfg)
            if canary == "stop":
                self.rejected.add(key)
                one.store.switch_current(old_version)
                return
        budget = rollout.Budget(leases, self.me, cfg.rollout.max_unavailable,
                                cfg.rollout.lease_ttl)
        slot = budget.acquire(f"{why}: {action.reason}", self._sleep)
        try:
            log.info("rollout.replacing", why=why, reason=action.reason, canary=canary == "canary",
                     version=key[0], image=key[1])
            _, container_id = one.reconcile(one.docker, spec)
            probe = one.wait_healthy(container_id)
            if probe.ok:
                one.store.mark_known_good(key[0])
                self._adopt(cfg, one, spec, container_id, key[0])
                self._canary_done(leases, canary, spec.labels[IMAGE_DIGEST], "healthy")
                log.info("rollout.applied", why=why, version=key[0], image=key[1])
                self.board.update(last_change={"why": why, "result": "applied",
                                               "version": key[0], "image": key[1]})
                return
            log.error("rollout.rolling_back", why=why, version=key[0], image=key[1],
                      error=probe.error, services=probe.services)
            self.rejected.add(key)
            self._canary_done(leases, canary, spec.labels[IMAGE_DIGEST], "failed")
            one.store.switch_current(old_version)
            _, container_id = one.reconcile(one.docker, old_spec)
            back = one.wait_healthy(container_id)
            self._adopt(self.cfg, one, old_spec, container_id, old_version)
            log.warning("rollout.rolled_back", version=old_version, healthy=back.ok,
                        rejected=key[0], note="not retried until the source changes again")
            self.board.m_rollbacks.inc()
            self.board.update(last_change={"why": why, "result": "rolled back",
                                           "rejected_version": key[0], "rejected_image": key[1],
                                           "error": probe.error})
        finally:
            budget.release(slot)

    def _adopt(self, cfg, one, spec, container_id, version) -> None:
        self.cfg, self.policy = cfg, watchdog.Policy.from_config(cfg)
        self.docker, self.spec, self.store = one.docker, spec, one.store
        self.container_id, self.stack_version = container_id, version
        self.state = replace(self.state, started_at=self.clock(), phase="starting",
                             since=self.clock(), container_up=True, successes=0, failures=0,
                             pending=None)
        self.board.update(state="starting", stack_version=version,
                          image_digest=spec.labels[IMAGE_DIGEST])
        self._fast_probe.set()
        self._probe_now.set()

    def _canary_gate(self, leases, digest: str, cfg: Config) -> str:
        """A new image: Quay migrates its database on the first start of a new version, so one
        node (the first to claim the upgrade record) goes first; the rest wait for its verdict.
        Returns "canary", "go" (the canary is healthy) or "stop" (it failed)."""
        waited = False
        while True:
            got = leases.get("upgrade")
            record = _json(got[0]) if got else None
            now = time.time()
            stale = record is not None and record.get("state") == "rolling" and \
                now - float(record.get("since", 0)) > cfg.rollout.lease_ttl
            if record is None or record.get("image") != digest or stale:
                body = json.dumps({"image": digest, "canary": self.me, "state": "rolling",
                                   "since": now}).encode()
                claimed = leases.create("upgrade", body) if got is None else \
                    leases.replace("upgrade", body, got[1])
                if claimed:
                    log.info("rollout.canary", image=digest, node=self.me)
                    return "canary"
                continue
            if record.get("state") == "healthy":
                return "go"
            if record.get("state") == "failed":
                log.error("rollout.stopped", image=digest, canary=record.get("canary"),
                          note="the canary failed on this image and rolled back; fix it and "
                               "change the lock again")
                return "stop"
            if record.get("canary") == self.me:
                return "canary"  # this agent restarted mid-upgrade
            if not waited:
                log.info("rollout.waiting_for_canary", image=digest, canary=record.get("canary"))
                waited = True
            self._sleep(2.0)

    def _canary_done(self, leases, canary, digest: str, state: str) -> None:
        if canary != "canary":
            return
        got = leases.get("upgrade")
        body = json.dumps({"image": digest, "canary": self.me, "state": state,
                           "since": time.time()}).encode()
        if got is None or not leases.replace("upgrade", body, got[1]):
            leases.create("upgrade", body)

    # --- the two feeders --------------------------------------------------------------------
    def _probe_loop(self) -> None:
        rds = None
        while not self.stop.is_set():
            cfg = self.cfg
            began = self.clock()
            try:
                result = health.probe(cfg.health.url, timeout=cfg.health.timeout,
                                      tls_verify=cfg.health.tls_verify, clock=self.clock)
                self.board.m_probe.observe(result.seconds)
                rds_down = False
                if not result.ok and cfg.report.rds and result.services.get("database") is False:
                    rds = rds or _Rds(cfg.report.rds)
                    rds_down = rds.unavailable()
                self.events.put(watchdog.Probed(self.clock(), result.ok,
                                                tuple(sorted(result.services.items())),
                                                result.error, result.status, rds_down))
            except Exception as err:  # noqa: BLE001 - a dead probe thread would freeze the state
                log.error("probe.failed", error=str(err))
            # A fixed cadence: a probe that hangs for `timeout` does not push the next one a
            # whole `interval` later, so detection stays within threshold x interval + timeout.
            pace = START_POLL if self._fast_probe.is_set() else cfg.health.interval
            self._probe_now.wait(max(0.0, pace - (self.clock() - began)))
            self._probe_now.clear()

    def _event_loop(self) -> None:
        """Docker's event stream: a die is acted on within a second, no polling. Reconnects
        when dockerd restarts; meanwhile the probes fail as usual."""
        name = self.cfg.container.name
        while not self.stop.is_set():
            try:
                stream = self.docker.client.events(
                    decode=True, filters={"type": "container", "container": name})
                for event in stream:
                    action = event.get("status") or event.get("Action")
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    if attributes.get("name") != self.cfg.container.name:
                        continue
                    now = self.clock()
                    if action == "die":
                        code = attributes.get("exitCode")
                        self.events.put(watchdog.Died(now, int(code) if code else None))
                    elif action == "start":
                        self.events.put(watchdog.Started(now))
                    elif action == "destroy":
                        self.events.put(watchdog.Missing(now))
            except Exception as err:  # noqa: BLE001 - dockerd went away: reconnect
                log.warning("docker.events_lost", error=str(err))
            self.stop.wait(1.0)


class _Rds:
    """RDS says whether the database is mid-failover or stopped (not `available`)."""

    def __init__(self, rds) -> None:
        self.db_instance = rds.db_instance
        self.region = rds.region
        self.client = None

    def unavailable(self) -> bool:
        import boto3

        try:
            if self.client is None:
                # Its own session: boto3's default one is not safe to share across threads.
                self.client = boto3.session.Session().client("rds", region_name=self.region)
            found = self.client.describe_db_instances(DBInstanceIdentifier=self.db_instance)
            status = found["DBInstances"][0]["DBInstanceStatus"]
        except Exception as err:  # noqa: BLE001 - unknown means: judge by Quay's answer alone
            log.warning("rds.unknown", db_instance=self.db_instance, error=str(err))
            return False
        if status != "available":
            log.info("rds.not_available", db_instance=self.db_instance, status=status)
        return status != "available"


def _started_at(docker, container_id: str, clock: Callable[[], float]) -> float:
    """When the container started, on our clock, so an adopted Quay is not given a fresh
    start period."""
    try:
        text = docker.client.api.inspect_container(container_id)["State"]["StartedAt"]
        match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?", text)
        started = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(
            tzinfo=datetime.timezone.utc).timestamp() + float(match.group(2) or 0)
        age = time.time() - started
    except Exception:  # noqa: BLE001 - unknown: give it a full start period
        age = 0.0
    return clock() - max(age, 0.0)


def _json(data: bytes):
    try:
        value = json.loads(data.decode())
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None
