"""How health is judged: one probe of Quay's /health/instance, parsed into a verdict."""
from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional
from urllib.parse import urlsplit

QUICK_POLL = 0.05
QUICK_SECONDS = 2.0
# While waiting for the first 200 after a (re)start, probe often: Quay answers within a second
# of being ready, and `run --once` should say so at once.
START_POLL = 0.25


@dataclass(frozen=True)
class Probe:
    """One answer (or non-answer) of the health endpoint.

    Attributes:
        ok: HTTP 200.
        status: the HTTP status, or None when nothing answered.
        services: Quay's per-service results, when the body had Quay's shape.
        error: why it failed, in words ("timed out after 5s", "HTTP 301 to https://...").
        seconds: how long the probe took.
    """

    ok: bool
    status: Optional[int]
    services: Dict[str, bool] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    @property
    def failing_services(self) -> list:
        return sorted(name for name, good in self.services.items() if not good)


def parse_body(body: bytes) -> Dict[str, bool]:
    """Quay's `{"data": {"services": {name: bool}}, "status_code": N}`; {} for any other shape."""
    try:
        data = json.loads(body.decode("utf-8"))
        services = data["data"]["services"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return {}
    if not isinstance(services, dict):
        return {}
    return {str(k): bool(v) for k, v in services.items() if isinstance(v, bool)}


def probe(url: str, *, timeout: float, tls_verify: bool = False,
          clock: Callable[[], float] = time.monotonic, raw: bool = False) -> Probe:
    """GET the health URL once. Never raises: every failure is a failed Probe. With `raw`, the
    answer's first bytes are kept as its `error` (for the pings)."""
    parts = urlsplit(url)
    started = clock()
    if parts.scheme == "https":
        context = ssl.create_default_context()
        if not tls_verify:
            # Quay's certificate names SERVER_HOSTNAME, never 127.0.0.1 (quay-facts.md).
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port or 443, timeout=timeout, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("GET", path, headers={"User-Agent": "quay-bootstrap"})
        response = conn.getresponse()
        payload = response.read(1 << 20)
        status = response.status
        location = response.getheader("Location", "")
    except socket.timeout:
        return Probe(False, None, error=f"timed out after {timeout:g}s",
                     seconds=clock() - started)
    except (OSError, http.client.HTTPException) as err:
        return Probe(False, None, error=f"{type(err).__name__}: {err}",
                     seconds=clock() - started)
    finally:
        conn.close()
    seconds = clock() - started
    if raw:
        return Probe(False, status, error=payload[:64].decode("utf-8", "replace"), seconds=seconds)
    services = parse_body(payload)
    if 300 <= status < 400:
        return Probe(False, status, error=f"HTTP {status} redirect to {location or '?'}: Quay "
                     "redirects HTTP to HTTPS when conf/stack has ssl.key; probe the HTTPS "
                     "port (health.url https://127.0.0.1:443/health/instance)", seconds=seconds)
    if status != 200:
        failing = sorted(k for k, v in services.items() if not v)
        why = f"HTTP {status}" + (f", failing: {', '.join(failing)}" if failing else "")
        return Probe(False, status, services, error=why, seconds=seconds)
    if not services:
        # A 200 without Quay's body is not Quay (a wrong health.url, a proxy's error page).
        return Probe(False, status, error="HTTP 200 without Quay's health body; check that "
                     "health.url is Quay's /health/instance", seconds=seconds)
    return Probe(True, status, services, seconds=seconds)


# Quay's own liveness pings (endpoints/web.py, endpoints/v1/__init__.py): through nginx to each
# gunicorn, touching no shared service. Quay's health checks call them with a 2 s timeout.
PINGS = ("/_internal_ping", "/v1/_internal_ping")
PING_TIMEOUT = 2.0


def ping_timeout(probe_timeout: float) -> float:
    """How long the agent's pings wait after a failed probe: the probe's own timeout (a busy
    gunicorn answers once its worker is free), never less than Quay's own 2 s."""
    return max(PING_TIMEOUT, probe_timeout)


def gunicorns_alive(url: str, *, tls_verify: bool = False, timeout: float = PING_TIMEOUT) -> bool:
    """Whether both of this Quay's gunicorns answer Quay's own ping, at the health URL's origin.

    Tells a slow or failing SHARED check (/health/instance timed out or answered an error without
    Quay's body, while the gunicorns are fine) from a hung or dead local one (the ping fails).
    """
    origin = urlsplit(url)._replace(path="", query="", fragment="").geturl()
    for path in PINGS:
        answer = probe(origin + path, timeout=timeout, tls_verify=tls_verify, raw=True)
        if answer.status != 200 or answer.error.strip() != "true":
            return False
    return True


def endtoend_url(url: str) -> str:
    """Quay's /health/endtoend (the shared services only: database, redis, storage, auth) at
    the health URL's origin."""
    return urlsplit(url)._replace(path="/health/endtoend", query="", fragment="").geturl()


def shared_down(answer: Probe) -> bool:
    """Whether a /health/endtoend answer says a shared service is down: Quay answered, not 200,
    naming services that failed. Nothing answering (no Quay here yet) says nothing."""
    return answer.status is not None and not answer.ok and bool(answer.failing_services)


def wait_healthy(url: str, *, within: float, interval: float, timeout: float,
                 tls_verify: bool = False, still_running: Callable[[], bool] = lambda: True,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> Probe:
    """Probe until the first 200 or until `within` seconds have passed.

    Returns the last probe. Stops early when `still_running()` says the container has exited.
    """
    started = clock()
    deadline = started + within
    answered: Optional[Probe] = None  # the last probe that got an HTTP answer
    while True:
        result = probe(url, timeout=min(timeout, max(deadline - clock(), 0.1)),
                       tls_verify=tls_verify, clock=clock)
        if result.status is not None:
            answered = result
        if result.ok:
            return result
        if clock() >= deadline:
            # A last probe cut short by the deadline says less than Quay's last real answer.
            return answered if result.status is None and answered else result
        if not still_running():
            return Probe(False, result.status, result.services,
                         error="the container exited: " + (result.error or "no answer"),
                         seconds=result.seconds)
        # Right after a start the first probes usually find nothing listening yet; poll fast
        # for a moment so "ready" is seen within milliseconds, then at `interval`.
        pace = QUICK_POLL if clock() - started < QUICK_SECONDS else interval
        sleep(min(pace, max(deadline - clock(), 0)))


class Prober:
    """The probe thread: probes on a fixed cadence and turns each answer into an observation.

    The timeout is above Quay's own worst case (a slow shared database must not look like a
    hung node), so a probe may take that long; the next one still starts on the cadence, beside
    it, so a hung Quay is seen within failure_threshold x interval + timeout +
    ping_timeout(timeout) (a probe without a verdict asks Quay's pings; the hung gunicorn's
    gives up after that). An answer older than one already fed is dropped. While Quay may still
    be starting (`fast` set) it probes every START_POLL, one at a time, to see "ready" at once;
    `wake` probes now.

    Args:
        settings: returns the live config and the URL to probe (they change on a roll).
        put: where observations go (the loop's queue).
        stop: the agent's stop event.
    """

    def __init__(self, settings: Callable, put: Callable, stop, *,
                 observe: Callable[[float], None] = lambda seconds: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        import threading

        self.settings = settings
        self.put = put
        self.stop = stop
        self.rds = None  # aws.Rds, made when `report.rds` is set and the database fails
        self.observe = observe
        self.clock = clock
        self.fast = threading.Event()
        self.fast.set()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._newest_fed = float("-inf")  # when the newest answer fed was asked for

    def follow(self, state, start_period: float, now: float) -> None:
        """Fast probes only while Quay may still be coming up, to see "ready" at once; after
        its start period, failures are counted at the configured pace."""
        starting = state.phase == "starting" and now - state.started_at < start_period
        (self.fast.set if starting else self.fast.clear)()

    def run(self) -> None:
        import math
        import threading

        while not self.stop.is_set():
            cfg, url = self.settings()
            began = self.clock()
            fast = self.fast.is_set()
            # At most as many probes in flight as fit in one probe's longest time (its timeout,
            # then the pings') at the cadence.
            longest = cfg.health.timeout + ping_timeout(cfg.health.timeout)
            room = 1 if fast else math.ceil(longest / cfg.health.interval) + 1
            with self._lock:
                go = self._in_flight < room
                self._in_flight += go
            if go:
                threading.Thread(target=self._one, args=(cfg, url, began), name="probe-one",
                                 daemon=True).start()
            pace = START_POLL if fast else cfg.health.interval
            self.wake.wait(max(0.0, pace - (self.clock() - began)))
            self.wake.clear()

    def _one(self, cfg, url: str, began: float) -> None:
        from quay_bootstrap.watchdog import Probed
        from quay_bootstrap.watchdog_events import GUNICORNS

        try:
            result = probe(url, timeout=cfg.health.timeout, tls_verify=cfg.health.tls_verify,
                           clock=self.clock)
            self.observe(result.seconds)
            # As Quay documents RDSAwareHealthCheck (real Quay's never asks: test_real_quay.py):
            # ask RDS only when the database failed.
            rds_down = bool(cfg.report.rds and not result.ok and
                            result.services.get("database") is False and
                            self._rds(cfg.report.rds).unavailable())
            # No verdict: a timeout or a server error without Quay's body (never a 2xx-4xx: a
            # wrong health.url must stay this node's problem, however well Quay pings).
            no_verdict = not result.failing_services and \
                (result.status is None or result.status >= 500)
            # Only a gunicorn failed Quay's own 2 s check, or no verdict at all: busy (every
            # worker waiting on a slow database, on every node at once) or hung? A busy one
            # answers the ping given the probe's own timeout (once its worker is free); a hung
            # or dead one never does. (CI, 2 cores under load: real Quay's answer took over the
            # 35 s timeout with 8 s database round trips, a 2 s ping found its one worker still
            # busy, and a node was restarted for a slowness every node had.)
            busy = bool(result.failing_services) and set(result.failing_services) <= GUNICORNS
            alive = bool(not result.ok and (no_verdict or busy) and gunicorns_alive(
                url, tls_verify=cfg.health.tls_verify, timeout=ping_timeout(cfg.health.timeout)))
            with self._lock:
                newest = began >= self._newest_fed
                self._newest_fed = max(self._newest_fed, began)
            if newest:
                self.put(Probed(self.clock(), result.ok, tuple(sorted(result.services.items())),
                                result.error, result.status, rds_down, alive))
        except Exception as err:  # noqa: BLE001 - a lost probe must not stop the watch
            import structlog

            structlog.get_logger(__name__).error("probe.failed", error=str(err))
        finally:
            with self._lock:
                self._in_flight -= 1

    def _rds(self, settings):
        if self.rds is None:
            from quay_bootstrap.aws import Rds

            self.rds = Rds(settings)
        return self.rds
