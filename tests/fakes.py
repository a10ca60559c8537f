"""Fakes at the edges, for unit tests of the roll and the daemon loop: Docker, the lease store,
a pipeline pass, the stack folder, systemd, escalation targets and a clock.

Like docker-py's fake_api_client and WALinuxAgent's mock wire protocol, each fake keeps the
state a user would look at (the containers, the leases, the stack links) and fails loudly on a
call it does not know: a new dependency of the code under test must be added here on purpose.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import structlog
import structlog.testing

from quay_bootstrap import health
from quay_bootstrap.budget import LeaseBody
from quay_bootstrap.config import Config, parse_config
from quay_bootstrap.container import MANAGED, Observed, Spec, build_spec, plan_recovery, plan_restart
from quay_bootstrap.pipeline import Outcome, Pass

CONFIG = """
stack: {source: "file:///srv/cluster/conf/stack", dir: /var/lib/quay-bootstrap/stack}
image: {reference: "quay.io/projectquay/quay:v3.9.0"}
"""


def make_config(extra: str = "") -> Config:
    """The minimal agent config plus `extra` YAML sections (e.g. "restart: {unhealthy_after: 2}")."""
    return parse_config(CONFIG + extra)


class _Loud:
    """Any attribute the fake does not define is a call the code under test was not expected
    to make: fail the test, naming it (private and dunder names stay AttributeErrors, so that
    hasattr() and copy still work)."""

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        raise AssertionError(f"unexpected call: {type(self).__name__}.{name}")


class FakeClock:
    """Seconds that move only when told: `sleep` advances it (and records the wait), then runs
    `on_sleep(clock)`, where a test changes the world the sleeper waits for or raises
    errors.Interrupted as the daemon's stop-aware sleep does on SIGTERM."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now
        self.slept: List[float] = []
        self.on_sleep: Optional[Callable[["FakeClock"], None]] = None

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        if self.on_sleep is not None:
            self.on_sleep(self)


# --- Docker ---------------------------------------------------------------------------------

@dataclass
class FakeContainer:
    id: str
    name: str
    status: str  # created, running, restarting, exited
    labels: Dict[str, str]
    spec: Optional[Spec] = None
    logs: str = ""  # what Quay printed; "runmigration.sh" once its migration step ran
    restart_policy: str = "unless-stopped"
    restarts: int = 0  # by Docker's restart policy


# Calls that change a container; a test asserts on them to prove "nothing was touched".
MUTATING = ("create_and_start", "start", "stop", "rename", "remove", "restart")


class FakeDocker(_Loud):
    """The part of engine.Docker the pipeline, the roll and the loop use, over containers in
    memory. `events` holds what Docker would stream (name, action, exit code) for each act, so a
    test can feed them back to the loop as the docker-events thread does. `restart_quay` keeps
    the real decision (container.plan_restart). Failures are injected per method with `fail`."""

    def __init__(self) -> None:
        self.containers: Dict[str, FakeContainer] = {}
        self.calls: List[Tuple[str, tuple]] = []
        self.events: List[Tuple[str, str, Optional[int], Optional[float]]] = []
        self.wall: Optional[Callable[[], float]] = None  # dates events as dockerd does; else none
        self.ages: Dict[str, float] = {}
        self._failures: Dict[str, List[BaseException]] = {}
        self._ids = itertools.count(1)

    # -- test controls -------------------------------------------------------------------------

    def fail(self, method: str, error: BaseException, times: int = 1) -> None:
        """The next `times` calls of `method` raise `error` before doing anything."""
        self._failures.setdefault(method, []).extend([error] * times)

    def named(self, name: str) -> Optional[FakeContainer]:
        return next((c for c in self.containers.values() if c.name == name), None)

    def crash(self, name: str, exit_code: int = 137) -> None:
        """Quay's process died (OOM, a fatal error): the container exits."""
        found = self._by_name(name)
        found.status = "exited"
        self._emit(found, "die", exit_code)

    def restarted_by_policy(self, name: str) -> None:
        """Docker's restart policy (unless-stopped) brought an exited container back."""
        found = self._by_name(name)
        found.status = "running"
        self._emit(found, "start")

    def take_events(self, name: str) -> List[Tuple[str, Optional[int], Optional[float]]]:
        """The events Docker streamed for containers called `name`, since the last take:
        (action, exit code, when)."""
        mine = [(action, code, when) for who, action, code, when in self.events if who == name]
        self.events = [e for e in self.events if e[0] != name]
        return mine

    def mutations(self) -> List[str]:
        return [name for name, _ in self.calls if name in MUTATING]

    # -- engine.Docker -------------------------------------------------------------------------

    def find(self, name: str) -> Optional[Observed]:
        self._call("find", name)
        found = self.named(name)
        return None if found is None else Observed(found.id, found.status, dict(found.labels),
                                                   found.spec.image if found.spec else "")

    def create_and_start(self, spec: Spec) -> str:
        self._call("create_and_start", spec.name)
        assert self.named(spec.name) is None, f"create: the name {spec.name!r} is taken (a 409)"
        container = FakeContainer(f"c{next(self._ids):03d}", spec.name, "running",
                                  dict(spec.labels), spec)
        self.containers[container.id] = container
        self._emit(container, "start")
        return container.id

    def start(self, container_id: str) -> None:
        self._call("start", container_id)
        found = self._get(container_id)
        if found.status != "running":
            found.status = "running"
            self._emit(found, "start")

    def stop(self, container_id: str, timeout: int) -> None:
        self._call("stop", container_id, timeout)
        found = self._get(container_id)
        if found.status in ("running", "restarting"):
            found.status = "exited"
            self._emit(found, "die", 143)

    def rename(self, container_id: str, name: str) -> None:
        self._call("rename", container_id, name)
        other = self.named(name)
        assert other is None or other.id == container_id, f"rename: {name!r} is taken"
        self._get(container_id).name = name

    def remove(self, container_id: str) -> None:
        self._call("remove", container_id)
        found = self.containers.pop(self._get(container_id).id)
        if found.status == "running":
            self._emit(found, "die", 137)
        self._emit(found, "destroy")

    def recover(self, name: str) -> None:
        self._call("recover", name)
        asides = {found.name: Observed(found.id, found.status, dict(found.labels))
                  for found in self.containers.values()
                  if found.name.startswith(f"{name}-previous-")}
        restore, remove = plan_recovery(self.find(name), asides)
        if restore:
            self.rename(asides[restore].id, name)
        for aside in remove:
            self.remove(asides[aside].id)
        return restore is not None

    def leave_restarts_to_the_agent(self, container_id: str) -> None:
        self._call("leave_restarts_to_the_agent", container_id)
        self.containers[container_id].restart_policy = "no"

    def logs(self, container_id: str) -> str:
        self._call("logs", container_id)
        found = self.containers.get(container_id)
        return found.logs if found else ""

    def running(self, container_id: str, restarts: Optional[int] = None) -> bool:
        self._call("running", container_id)
        found = self.containers.get(container_id)
        return found is not None and found.status == "running"

    def restart_count(self, container_id: str) -> int:
        self._call("restart_count", container_id)
        found = self.containers.get(container_id)
        return found.restarts if found else 0

    def restart_quay(self, spec: Spec, recreate: bool, exited: bool,
                     expect: Callable[[Tuple[str, ...]], None]) -> Optional[str]:
        self._call("restart_quay", spec.name, recreate, exited)
        found = self.find(spec.name)
        kind, echoes = plan_restart(found, recreate, exited)
        if kind in ("refuse", "none"):
            return None
        expect(echoes)
        if kind in ("recreate", "create"):
            if found is not None:
                self.remove(found.id)
            return self.create_and_start(spec)
        if kind == "restart":
            self._call("restart", found.id)
            container = self._get(found.id)
            self._emit(container, "die", 143)
            container.status = "running"
            self._emit(container, "start")
        else:
            self.start(found.id)
        return None

    def stop_quay(self, spec: Spec) -> None:
        self._call("stop_quay", spec.name)
        found = self.named(spec.name)
        if found is not None and found.labels.get(MANAGED) == "true":
            self.stop(found.id, spec.stop_timeout)

    def age(self, container_id: str) -> float:
        self._call("age", container_id)
        return self.ages.get(container_id, 0.0)

    def watch(self, name: str, stop, on_event: Callable[[str, Optional[int], Optional[float]], None],
              resume=None) -> None:
        """Delivers what is in `events` for `name` and returns (the real one loops until stop)."""
        self._call("watch", name)
        for action, code, when in self.take_events(name):
            on_event(action, code, when)

    # -- internals -----------------------------------------------------------------------------

    def _call(self, method: str, *args) -> None:
        self.calls.append((method, args))
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)

    def _get(self, container_id: str) -> FakeContainer:
        assert container_id in self.containers, f"no container {container_id!r} (a 404)"
        return self.containers[container_id]

    def _by_name(self, name: str) -> FakeContainer:
        found = self.named(name)
        assert found is not None, f"no container named {name!r}"
        return found

    def _emit(self, container: FakeContainer, action: str, code: Optional[int] = None) -> None:
        self.events.append((container.name, action, code, self.wall() if self.wall else None))


# --- the lease store ------------------------------------------------------------------------

class MemoryLeases(_Loud):
    """A LeaseStore in memory with the conditional semantics of stores.file.FileLeases: create
    only when absent, replace only the version `get` returned (every write makes a new token),
    delete without error when gone. `fail` makes the next calls of a method raise, as a store
    that blinks does."""

    def __init__(self) -> None:
        self.objects: Dict[str, Tuple[bytes, str]] = {}
        self._tokens = itertools.count(1)
        self._failures: Dict[str, List[BaseException]] = {}
        self._lock = threading.Lock()

    def fail(self, method: str, error: BaseException, times: int = 1) -> None:
        self._failures.setdefault(method, []).extend([error] * times)

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        self._maybe_fail("get")
        return self.objects.get(key)

    def create(self, key: str, data: bytes) -> bool:
        self._maybe_fail("create")
        with self._lock:
            if key in self.objects:
                return False
            self.objects[key] = (bytes(data), str(next(self._tokens)))
            return True

    def replace(self, key: str, data: bytes, token: str) -> bool:
        self._maybe_fail("replace")
        with self._lock:
            if key not in self.objects or self.objects[key][1] != token:
                return False
            self.objects[key] = (bytes(data), str(next(self._tokens)))
            return True

    def delete(self, key: str) -> None:
        self._maybe_fail("delete")
        self.objects.pop(key, None)

    # -- for assertions and set-up -------------------------------------------------------------

    def lease(self, slot: int = 0) -> Optional[LeaseBody]:
        got = self.objects.get(f"lease-{slot}")
        return None if got is None else LeaseBody.decode(got[0])

    def leases(self) -> Dict[str, Optional[LeaseBody]]:
        """The leases that hold a slot (a released one is left behind already expired)."""
        found = {k: LeaseBody.decode(v[0]) for k, v in self.objects.items()
                 if k.startswith("lease-")}
        return {k: body for k, body in found.items() if body is None or body.expires > 0}

    def record(self) -> Optional[dict]:
        """The canary's upgrade record."""
        got = self.objects.get("upgrade")
        return None if got is None else json.loads(got[0].decode())

    def put(self, key: str, data) -> None:
        """Write as another node did, unconditionally."""
        if isinstance(data, dict):
            data = json.dumps(data).encode()
        self.objects[key] = (data, str(next(self._tokens)))

    def _maybe_fail(self, method: str) -> None:
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)


# --- the stack folder and the pipeline pass -------------------------------------------------

class FakeStackStore(_Loud):
    """The stack folder's links (current, last-known-good, in-use), as a user would list them."""

    def __init__(self, root: Path = Path("/var/lib/quay-bootstrap/stack")) -> None:
        self.root = root
        self.links: Dict[str, Optional[str]] = {"current": None, "last-known-good": None,
                                                "in-use": None}
        self.known_good_marks: List[str] = []
        self.rejected: List[tuple] = []  # what StackStore keeps in rejected.json

    def reject(self, version: str, image: str, spec: str) -> None:
        self.rejected.append((version, image, spec))

    def is_rejected(self, version: str, image: str, spec: str) -> bool:
        return (version, image, spec) in self.rejected

    def current(self) -> Optional[str]:
        return self.links["current"]

    def known_good(self) -> Optional[str]:
        return self.links["last-known-good"]

    def in_use(self) -> Optional[str]:
        return self.links["in-use"]

    def path(self, version: str) -> Path:
        return self.root / "versions" / version

    def fetched(self, version: str) -> None:
        """What the fetcher's commit does: `current` points at the version just fetched."""
        self.links["current"] = version

    def switch_current(self, version: str) -> None:
        self.links["current"] = version

    def mark_known_good(self, version: str) -> None:
        self.links["last-known-good"] = version
        self.known_good_marks.append(version)

    def mark_in_use(self, version: str) -> None:
        self.links["in-use"] = version


@dataclass(frozen=True)
class Release:
    """What the cluster's source says this node should run: a stack version and a locked image."""

    version: str
    digest: str
    image_id: str
    tag: str = "v3.9.0"


V1 = Release("stack-v1", "sha256:" + "1" * 64, "sha256:image-v3.9.0")
V2 = Release("stack-v2", "sha256:" + "1" * 64, "sha256:image-v3.9.0")  # a new stack only
V3 = Release("stack-v3", "sha256:" + "3" * 64, "sha256:image-v3.10.0", "v3.10.0")  # new image


def probe(ok: bool = True, error: str = "HTTP 503, failing: web_gunicorn") -> health.Probe:
    if ok:
        return health.Probe(True, 200, {"database": True, "web_gunicorn": True})
    return health.Probe(False, 503, {"database": True, "web_gunicorn": False}, error=error)


class FakePass(_Loud):
    """What the roll and the loop use of a pipeline Pass. The stack, lock and image steps are
    faked (`prepare` builds the spec of `release`, as if fetched and pulled); health answers
    with `verdicts`, one per wait (a bool, a Probe, or a callable given the container id;
    healthy once they run out). Deciding and reconciling are the real Pass code, run against
    the FakeDocker, so the container a test inspects is what the real pass would leave."""

    decide = Pass.decide
    reconcile = Pass.reconcile
    _reconcile = Pass._reconcile
    _replace = Pass._replace
    live = Pass.live
    adopt_running = Pass.adopt_running
    _timed = Pass._timed
    _news = Pass._news
    run = Pass.run

    def __init__(self, cfg: Config, docker: FakeDocker, store: FakeStackStore, release: Release,
                 verdicts=(), prepare_error: Optional[BaseException] = None) -> None:
        self.cfg = cfg
        self.docker = docker
        self.store = store
        self.release = release
        self.verdicts = list(verdicts)
        self.prepare_error = prepare_error
        self.waited: List[str] = []  # the container ids health was awaited for
        # Quay's /health/endtoend: the shared services (a test sets a failing answer).
        self.shared = health.Probe(True, 200, {"database": True, "redis": True})
        self.outcome = Outcome(healthy=False)
        self.clock = lambda: 0.0  # step timings in the summary: not what these tests read

    def prepare(self) -> Spec:
        if self.prepare_error is not None:
            raise self.prepare_error
        release = self.release
        self.store.fetched(release.version)
        self.spec = build_spec(self.cfg.container, release.image_id, release.digest,
                               self.store.path(release.version), release.version, release.tag)
        self.health_url = "http://127.0.0.1:8080/health/instance"
        self.outcome.stack_version, self.outcome.image_digest = release.version, release.digest
        return self.spec

    def endtoend(self) -> health.Probe:
        return self.shared

    def wait_healthy(self, container_id: str) -> health.Probe:
        self.waited.append(container_id)
        verdict = self.verdicts.pop(0) if self.verdicts else True
        if callable(verdict):
            verdict = verdict(container_id)
        return verdict if isinstance(verdict, health.Probe) else probe(bool(verdict))


# --- what the agent tells the world ---------------------------------------------------------

class FakeSystemd(_Loud):
    """status.Systemd without a NOTIFY_SOCKET, keeping what it would have said."""

    watchdog_every = None

    def __init__(self) -> None:
        self.said: List[str] = []

    def notify(self, *lines: str) -> None:
        self.said.extend(lines)

    @contextlib.contextmanager
    def keepalive(self) -> Iterator[None]:
        yield


class FakeTarget(_Loud):
    """An escalation target (the Auto Scaling group, the on_unhealthy command)."""

    def __init__(self, name: str, answer: bool = True) -> None:
        self.name = name
        self.answer = answer
        self.marks: List[str] = []
        self.clears = 0
        self.marked = threading.Event()

    def mark(self, reason: str) -> bool:
        self.marks.append(reason)
        self.marked.set()
        return self.answer

    def clear(self) -> None:
        self.clears += 1


# --- logs -----------------------------------------------------------------------------------

@contextlib.contextmanager
def captured_logs() -> Iterator[List[dict]]:
    """structlog.testing.capture_logs, made independent of what ran before: the CLI's
    configure() caches each module's logger on first use (with the processors of that moment)
    and filters by level, so another test module may have left loggers capture_logs cannot see."""
    saved = structlog.get_config()
    structlog.reset_defaults()
    for name, module in list(sys.modules.items()):
        if name.startswith("quay_bootstrap"):
            proxy = getattr(module, "log", None)
            if isinstance(proxy, structlog._config.BoundLoggerLazyProxy):
                vars(proxy).pop("bind", None)  # the cached logger
    try:
        with structlog.testing.capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(**saved)


def events(logs: List[dict], name: str) -> List[dict]:
    return [entry for entry in logs if entry["event"] == name]
