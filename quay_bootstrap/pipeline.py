"""One full pass of the pipeline: stack -> image lock -> image -> container -> health."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import structlog
import tenacity

from quay_bootstrap import health
from quay_bootstrap.config import Config
from quay_bootstrap.container import (
    IMAGE_DIGEST,
    IMAGE_TAG,
    STACK_VERSION,
    Action,
    Observed,
    Spec,
    build_spec,
    decide,
    health_url,
)
from quay_bootstrap.engine import Docker
from quay_bootstrap.errors import (
    ConfigError,
    ContainerError,
    LockViolation,
    SourceError,
    TransientError,
    Unavailable,
)
from quay_bootstrap.image import ensure_image, registry_auth
from quay_bootstrap.lock import Resolved, resolve
from quay_bootstrap.stack.fetch import Fetcher, FetchResult
from quay_bootstrap.stack.plan import Limits
from quay_bootstrap.stack.store import StackStore
from quay_bootstrap.stores import open_object, open_source

log = structlog.get_logger(__name__)


@dataclass
class Step:
    name: str
    result: str
    detail: str
    seconds: float


@dataclass
class Outcome:
    healthy: bool
    steps: List[Step] = field(default_factory=list)
    stack_version: str = ""
    image_digest: str = ""
    container_id: str = ""
    probe: Optional[health.Probe] = None


@dataclass(frozen=True)
class Live:
    """What this node runs: the config it was made from, the container's spec and id, and the
    stack version the container mounts."""

    cfg: Config
    spec: Spec
    stack_version: str
    container_id: str
    health_url: str = ""


@dataclass
class Pass:
    """Args: the agent config; the redactor's `add`; the stack folder (default: the one
    `cfg.stack.dir` names); a Docker factory."""

    cfg: Config
    add_secrets: Callable
    store: Optional[StackStore] = None
    docker_factory: Callable[[], Docker] = Docker
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    # The daemon passes one dict for all its passes, so a refresh every minute reuses the S3 or
    # GCS client and the Docker client instead of building new ones (memory, connections).
    cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.outcome = Outcome(healthy=False)  # filled step by step, even when a step fails
        if self.store is None:
            self.store = open_stack_store(self.cfg, self.add_secrets)

    def live(self) -> Live:
        """What the node runs after `run`."""
        return Live(self.cfg, self.spec, self.outcome.stack_version, self.outcome.container_id,
                    self.health_url)

    def run(self, wait_for_health: bool = True,
            entry: Callable[[Spec], Spec] = lambda spec: spec,
            before_start: Callable[[Spec], None] = lambda spec: None) -> Outcome:
        """The pass. Without `wait_for_health` it stops once the container runs (the daemon's
        watchdog takes over from there). `entry` sets the entry point the shared database
        allows; `before_start` is called before a container is created, replaced or started."""
        outcome = self.outcome
        spec = entry(self.prepare())
        decided = self.decide(spec)
        if decided[1].kind in ("create", "replace", "start"):
            before_start(spec)
        _, container_id = self._timed(outcome, "container",
                                      lambda: self.reconcile(self.docker, spec, decided))
        outcome.container_id = container_id
        if not wait_for_health:
            return outcome
        probe = self._timed(outcome, "health", lambda: self.wait_healthy(container_id))
        outcome.probe, outcome.healthy = probe, probe.ok
        if probe.ok:
            self.store.mark_known_good(outcome.stack_version)
        return outcome

    def adopt_running(self, found: Observed) -> Live:
        """A running Quay (perhaps of an older stack, image or spec) as this node's live one."""
        version = found.labels[STACK_VERSION]
        path = self.store.path(version)
        spec = build_spec(self.cfg.container, found.image, found.labels[IMAGE_DIGEST], path,
                          version, found.labels.get(IMAGE_TAG, ""))
        self.store.mark_in_use(version)
        return Live(self.cfg, spec, version, found.id,
                    self.cfg.health.url or health_url(self.cfg.container, path))

    def prepare(self) -> Spec:
        """Everything before touching the container: the stack fetched and live, the lock
        resolved, the image pulled and verified. Returns the container the node should run."""
        outcome = self.outcome
        stack = self._timed(outcome, "stack", self._fetch)
        resolved = self._timed(outcome, "lock", self._resolve)
        if "docker" not in self.cache:
            self.cache["docker"] = self.docker_factory()
        self.docker = self.cache["docker"]
        auth = registry_auth(self.cfg.image.auth, resolved.ref.registry, self.add_secrets)
        image = self._timed(outcome, "image", lambda: ensure_image(
            self.docker, resolved.ref, auth=auth, deadline=self.cfg.image.pull_deadline,
            sleep=self.sleep))
        self.spec = build_spec(self.cfg.container, image.id, image.digest, stack.path,
                               stack.version, resolved.ref.tag or "")
        self.health_url = self.cfg.health.url or health_url(self.cfg.container, stack.path)
        outcome.stack_version, outcome.image_digest = stack.version, image.digest
        return self.spec

    def wait_healthy(self, container_id: str) -> health.Probe:
        restarts = self.docker.restart_count(container_id)  # Docker's restarts from now on count
        return health.wait_healthy(
            self.health_url, within=self.cfg.health.start_period, interval=health.START_POLL,
            timeout=self.cfg.health.timeout, tls_verify=self.cfg.health.tls_verify,
            still_running=lambda: self.docker.running(container_id, restarts), sleep=self.sleep,
            clock=self.clock)

    def endtoend(self) -> health.Probe:
        """One probe of this node's Quay's /health/endtoend (the shared services)."""
        return health.probe(health.endtoend_url(self.health_url), timeout=self.cfg.health.timeout,
                            tls_verify=self.cfg.health.tls_verify)

    def _timed(self, outcome: Outcome, name: str, call):
        started = self.clock()
        value = call()
        seconds = self.clock() - started
        result, detail = _describe(name, value)
        outcome.steps.append(Step(name, result, detail, seconds))
        level = "info" if self._news(name, value) else "debug"
        getattr(log, level)(f"{name}.done", result=result, detail=detail,
                            seconds=round(seconds, 3))
        return value

    def _news(self, name: str, value) -> bool:
        """Whether a step's line is news at info level: always in a pass of its own (`run
        --once`); in the daemon's refreshes (one `cache` for all its passes), only when the
        locked reference or the image digest differs from the last pass's or an image was
        pulled; a new stack is the fetch's one `stack.applied` line. A refresh that changes
        nothing logs at debug."""
        key_of = _STEADY.get(name)
        if key_of is None:
            return True
        last = self.cache.setdefault("last_steps", {})
        first, key = name not in last, key_of(value)
        news = last.get(name) != key or bool(getattr(value, "changed", False)
                                             or getattr(value, "pulled", False))
        last[name] = key
        # A new stack in a refresh is told once, by the fetch's `stack.applied` (the version,
        # the previous one, the files): its step line would say it twice.
        return first or (news and name != "stack")

    def _fetch(self) -> FetchResult:
        return fetcher(self.cfg, self.store, self.add_secrets, self.cache, self.sleep,
                       self.clock).fetch()

    def _resolve(self) -> Resolved:
        return resolve_image(self.cfg, self.sleep, self.cache)

    def decide(self, spec: Spec) -> Tuple[Optional[Observed], Action]:
        """What reconciling to `spec` would do, without doing it (after putting back a Quay
        that a replacement cut off by kill -9 had set aside)."""
        self.docker.recover(spec.name)
        found = self.docker.find(spec.name)
        return found, decide(found, spec, self.cfg.container.adopt_unmanaged)

    def reconcile(self, docker: Docker, spec: Spec,
                  decided: Optional[Tuple[Optional[Observed], Action]] = None) -> Tuple[Action, str]:
        """Make the container `spec` (with what `decide` found, when already asked); records
        the stack version it mounts as in use."""
        action, container_id = self._reconcile(docker, spec, decided)
        docker.recover(spec.name)  # asides an interrupted replacement kept until Quay ran
        self.store.mark_in_use(spec.labels[STACK_VERSION])
        return action, container_id

    def _reconcile(self, docker: Docker, spec: Spec, decided) -> Tuple[Action, str]:
        if docker.recover(spec.name):
            decided = None  # what was decided did not know the container put back
        found, action = decided or (docker.find(spec.name), None)
        action = action or decide(found, spec, self.cfg.container.adopt_unmanaged)
        log.info("container.reconcile", action=action.kind, reason=action.reason,
                 name=spec.name)
        if action.kind == "refuse":
            raise ContainerError(action.reason + "; it was left untouched",
                                 where=f"container {spec.name}",
                                 hint="Rename or remove it, or set container.adopt_unmanaged: "
                                      "true to let quay-bootstrap replace it")
        if action.kind == "adopt":
            return action, found.id
        if action.kind == "start":
            docker.start(found.id)
            return action, found.id
        if action.kind == "create":
            return action, docker.create_and_start(spec)
        return action, self._replace(docker, found, spec)

    def _replace(self, docker: Docker, old, spec: Spec) -> str:
        """Stop the old container but keep it until the new one runs, to put it back on failure."""
        aside = f"{spec.name}-previous-{int(time.time())}"
        docker.stop(old.id, spec.stop_timeout)
        docker.rename(old.id, aside)
        try:
            new_id = docker.create_and_start(spec)
        except Exception:
            log.error("container.replace_failed", restoring=aside)
            docker.rename(old.id, spec.name)
            if old.status in ("running", "restarting"):
                docker.start(old.id)
            raise
        docker.remove(old.id)
        return new_id


def fetcher(cfg: Config, store: StackStore, add_secrets: Callable, cache: Optional[dict] = None,
            sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> Fetcher:
    """The fetch of `cfg.stack` into `store`; its source client is kept in `cache`."""
    stack = cfg.stack
    cache = {} if cache is None else cache
    key = ("source", stack.source, stack.endpoint_url, stack.region, stack.ca_bundle,
           stack.concurrency)
    if key not in cache:
        cache[key] = open_source(stack.source, stack, concurrency=stack.concurrency)
    # Every fetch: an instance profile's keys change as they are refreshed.
    add_secrets(cache[key].secrets())
    published = ("published",) + key[1:]
    if published not in cache:  # the pointer beside the source (stack/published.py)
        from quay_bootstrap.stack.published import open_published

        cache[published] = open_published(stack, client=getattr(cache[key], "client", None))
    return Fetcher(source=cache[key], store=store, limits=Limits(stack.max_files, stack.max_bytes),
                   concurrency=stack.concurrency, deadline=stack.retry_deadline,
                   keep_versions=stack.keep_versions, add_secrets=add_secrets, sleep=sleep,
                   clock=clock, container_env=cfg.container.env, published=cache[published],
                   verify_key=_verify_key(stack.verify_key), settle=stack.settle)


def _verify_key(path) -> Optional[bytes]:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise ConfigError(f"stack.verify_key cannot be read: {err.strerror}", where=str(path),
                          hint="Install the publisher's ed25519 public key (PEM) there") from err


def open_stack_store(cfg: Config, add_secrets: Callable) -> StackStore:
    """The stack folder, with the live config.yaml's secrets registered for redaction before
    anything about it can be logged."""
    import os

    import yaml

    from quay_bootstrap import safe_yaml
    from quay_bootstrap.stack.validate import key_secrets, stack_secrets

    owner = cfg.stack.uid_gid
    if os.geteuid() != 0:
        log.warning("stack.owner_ignored", owner=cfg.stack.owner,
                    reason="not running as root: the files keep this user's ownership")
        owner = None
    store = StackStore(cfg.stack.dir, owner)
    current = store.current()
    if current:
        live = store.path(current)
        try:
            add_secrets(stack_secrets(safe_yaml.load((live / "config.yaml").read_bytes())))
        except (OSError, ValueError, yaml.YAMLError):
            pass  # a live stack without a readable config.yaml holds no secrets we can find
        try:
            add_secrets(key_secrets((live / "ssl.key").read_bytes()))
        except OSError:
            pass
    return store


def resolve_image(cfg: Config, sleep: Callable[[float], None] = time.sleep,
                  cache: Optional[dict] = None) -> Resolved:
    """The image this node must run: the cluster lock (read through the stack's sources) when
    `image.lock` is set, else `image.reference`; the tag policy applies to both."""
    image = cfg.image
    if not image.lock:
        return resolve(image.reference, image.allowed_tags)
    cache = {} if cache is None else cache
    # Every stack setting the client is made from (stores' client()): a changed CA bundle
    # must not keep verifying the store with the old one.
    opened = ("lock", image.lock, cfg.stack.endpoint_url, cfg.stack.region, cfg.stack.ca_bundle)
    if opened not in cache:
        cache[opened] = open_object(image.lock, cfg.stack)
    source, key = cache[opened]
    try:
        for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(TransientError),
                stop=tenacity.stop_after_delay(cfg.stack.retry_deadline),
                wait=tenacity.wait_random_exponential(multiplier=0.5, max=15),
                sleep=sleep, reraise=True):
            with attempt:
                text = source.get(key)
    except TransientError as err:
        raise Unavailable(f"the cluster image lock could not be read: {err}",
                          where=image.lock, hint="Check the network path to the store") from err
    except SourceError as err:
        raise LockViolation(f"the cluster image lock cannot be read: {err.message}",
                            where=image.lock, hint="Write the lock file, or unset "
                            "image.lock to use image.reference") from err
    resolved = resolve(image.reference, image.allowed_tags, text, image.lock)
    if resolved.overridden:
        log.warning("image.lock_overrides", configured=image.reference,
                    locked=str(resolved.ref), lock=image.lock)
    return resolved


# What a step's line is about, for `Pass._news`: a refresh repeating it is not news.
_STEADY: Dict[str, Callable] = {"stack": lambda fetched: fetched.version,
                                "lock": lambda resolved: str(resolved.ref),
                                "image": lambda image: image.digest}


def _describe(name: str, value) -> tuple:
    if name == "stack":
        return ("applied" if value.changed else "unchanged",
                f"version {value.version[:12]}, {value.files} files "
                f"({value.downloaded} downloaded)")
    if name == "lock":
        return ("cluster lock" if value.overridden else "config", str(value.ref))
    if name == "image":
        return ("pulled" if value.pulled else "present", value.digest)
    if name == "container":
        action, container_id = value
        done = {"create": "created", "adopt": "adopted", "start": "started",
                "replace": "replaced"}[action.kind]
        return done, f"{container_id[:12]}: {action.reason}"
    if name == "health":
        if value.ok:
            return "healthy", f"HTTP {value.status}"
        return "unhealthy", value.error
    return "", str(value)
