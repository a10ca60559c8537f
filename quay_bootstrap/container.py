"""How the Quay container runs: the desired spec and the reconcile decision (pure), and Docker (I/O)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import structlog

from quay_bootstrap.errors import ConfigError, ContainerError, Unavailable

log = structlog.get_logger(__name__)

LABEL = "io.quay-bootstrap"
MANAGED = f"{LABEL}.managed"
STACK_VERSION = f"{LABEL}.stack-version"
IMAGE_DIGEST = f"{LABEL}.image-digest"
SPEC_HASH = f"{LABEL}.spec-hash"
STACK_MOUNT = "/conf/stack"
# Quay's documented run flag; Docker refuses net.* sysctls with host networking.
BRIDGE_SYSCTLS = {"net.core.somaxconn": "4096"}
# Inside Quay 3.x's container: HTTP (only a 301 to HTTPS once conf/stack has ssl.key), HTTPS.
HTTP_PORT, HTTPS_PORT = 8080, 8443


@dataclass(frozen=True)
class Spec:
    """Everything the Quay container is created from; its hash detects drift."""

    name: str
    image: str  # the image ID: immutable, unlike a tag
    ports: Dict[str, Any]
    binds: Tuple[str, ...]
    env: Dict[str, str]
    sysctls: Dict[str, str]
    network_mode: Optional[str]
    privileged: bool
    stop_timeout: int
    labels: Dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        data = asdict(self)
        data.pop("labels")
        # The stack mount follows the stack version, which has a label of its own.
        data["binds"] = [b for b in self.binds if f":{STACK_MOUNT}:" not in b]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def parse_ports(items: List[str]) -> Dict[str, Any]:
    """["443:8443", "127.0.0.1:80:8080/tcp"] -> {"8443/tcp": 443, "8080/tcp": ("127.0.0.1", 80)}."""
    ports: Dict[str, Any] = {}
    for item in items:
        spec, _, proto = item.partition("/")
        parts = spec.split(":")
        host_ip, host_port, container_port = ([None] + parts)[-3:] if len(parts) == 2 else parts
        key = f"{container_port}/{proto or 'tcp'}"
        ports[key] = (host_ip, int(host_port)) if host_ip else int(host_port)
    return ports


def build_spec(container, image_id: str, image_digest: str, stack_path: Path,
               stack_version: str) -> Spec:
    """The desired container from `container:` config, the pulled image and the live stack.

    The stack is the resolved version folder, read-only, so a later switch of `current` never
    changes a running container's files.
    """
    # Z: relabel for SELinux hosts, as Quay's documented run does (a no-op elsewhere).
    binds = (f"{stack_path}:{STACK_MOUNT}:ro,Z", *container.volumes)
    spec = Spec(
        name=container.name, image=image_id,
        ports={} if container.network_mode == "host" else parse_ports(container.ports),
        binds=tuple(binds), env=dict(container.env),
        sysctls=dict(container.sysctls if container.sysctls is not None else
                     {} if container.network_mode == "host" else BRIDGE_SYSCTLS),
        network_mode=container.network_mode, privileged=container.privileged,
        stop_timeout=int(container.stop_timeout))
    labels = {MANAGED: "true", STACK_VERSION: stack_version, IMAGE_DIGEST: image_digest,
              SPEC_HASH: spec.digest()}
    return replace(spec, labels=labels)


def health_url(container, stack_path: Path) -> str:
    """Where Quay's /health/instance answers on this host: HTTPS on what 8443 maps to when the
    stack has ssl.key (8080 then only redirects), else HTTP on what 8080 maps to (also with
    EXTERNAL_TLS_TERMINATION); the ports themselves with host networking.

    Raises:
        ConfigError: the port Quay serves on is not published.
    """
    tls = (stack_path / "ssl.key").exists()
    inside, scheme = (HTTPS_PORT, "https") if tls else (HTTP_PORT, "http")
    if container.network_mode == "host":
        return f"{scheme}://127.0.0.1:{inside}/health/instance"
    for published, target in parse_ports(container.ports).items():
        if published == f"{inside}/tcp":
            host, port = target if isinstance(target, tuple) else ("127.0.0.1", target)
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            return f"{scheme}://{host}:{port}/health/instance"
    raise ConfigError(f"Quay serves {scheme.upper()} on {inside} in its container, and "
                      "container.ports does not publish it, so its health cannot be probed",
                      where="container.ports",
                      hint=f"Publish it (e.g. \"{443 if tls else 80}:{inside}\") or set health.url")


@dataclass(frozen=True)
class Observed:
    """A container found under the configured name."""

    id: str
    status: str  # created, running, restarting, paused, exited, dead
    labels: Dict[str, str]
    image: str = ""  # the image ID it runs


@dataclass(frozen=True)
class Action:
    kind: str  # create, adopt, start, replace, refuse
    reason: str


def decide(found: Optional[Observed], desired: Spec, adopt_unmanaged: bool = False) -> Action:
    """What reconciling must do to make `found` into `desired`; idempotent by construction."""
    if found is None:
        return Action("create", "no container named " + desired.name)
    if found.labels.get(MANAGED) != "true":
        if adopt_unmanaged:
            return Action("replace", "container.adopt_unmanaged is true: taking over a "
                                     "container quay-bootstrap did not create")
        return Action("refuse", f"a container named {desired.name!r} exists that quay-bootstrap "
                                "did not create")
    drift = [what for label, what in ((IMAGE_DIGEST, "image"), (STACK_VERSION, "stack version"),
                                      (SPEC_HASH, "container spec"))
             if found.labels.get(label) != desired.labels[label]]
    if drift:
        return Action("replace", "changed: " + ", ".join(drift))
    if found.status in ("running", "restarting"):
        return Action("adopt", "already running the desired image, stack and spec")
    return Action("start", f"the container is {found.status}")


def plan_restart(found: Optional[Observed], recreate: bool = False,
                 exited: bool = False) -> Tuple[str, Tuple[str, ...]]:
    """How the watchdog's restart is carried out, and the Docker events it will echo.

    Returns (kind, echoes): kind is "refuse" (a stranger took Quay's name), "create",
    "recreate", "none" (Docker's restart policy already brought an exited Quay back: a second
    restart would double it), "restart" or "start".
    """
    if found is not None and found.labels.get(MANAGED) != "true":
        return "refuse", ()
    if found is None:
        return "create", ("start",)
    if recreate:
        gone = ("die", "destroy") if found.status == "running" else ("destroy",)
        return "recreate", gone + ("start",)
    if found.status == "running" and exited:
        return "none", ()
    if found.status in ("running", "restarting", "paused"):
        return "restart", ("die", "start")
    return "start", ("start",)


def plan_recovery(current: Optional[Observed],
                  asides: Dict[str, Observed]) -> Tuple[Optional[str], List[str]]:
    """What to do with `NAME-previous-*` containers a replacement left when it was cut off.

    A replacement stops the old Quay, renames it aside, creates the new one, then removes the
    old. Killed before the new one exists, the aside one is the only Quay: it is renamed back
    (the newest, if several). Once the new one runs, the aside ones are stale. In between (the
    new one created but not running) they are kept: they may yet be needed.

    Returns (the aside to rename back, the asides to remove); only managed ones are touched.
    """
    ours = sorted((name for name, found in asides.items()
                   if found.labels.get(MANAGED) == "true"), reverse=True)
    if current is None and ours:
        return ours[0], ours[1:]
    if current is not None and current.status == "running":
        return None, [name for name in ours if asides[name].status != "running"]
    return None, []


_PORT_IN_USE = re.compile(r"(?:Bind for |listen tcp\d? )(\S+?):? (?:failed|bind)")


class Docker:
    """The Docker engine, through the docker SDK. Args: base_url (None = DOCKER_HOST or the
    default socket); how long to wait for the daemon to answer."""

    def __init__(self, base_url: Optional[str] = None, *, connect_deadline: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import docker

        self._errors = docker.errors
        where = base_url or _default_socket()
        deadline = time.monotonic() + connect_deadline
        while True:
            try:
                self.client = _client_without_user_config(docker, base_url)
                self.client.ping()
                break
            except docker.errors.DockerException as err:
                if time.monotonic() >= deadline:
                    raise Unavailable("the Docker daemon does not answer", where=where,
                                      hint="Start it (systemctl start docker) or set "
                                           "DOCKER_HOST; the agent needs it to run Quay") from err
                sleep(0.5)
        self.where = where

    def find(self, name: str) -> Optional[Observed]:
        try:
            found = self.client.containers.get(name)
        except self._errors.NotFound:
            return None
        return Observed(found.id, found.status, dict(found.labels or {}),
                        found.attrs.get("Image", ""))

    def create_and_start(self, spec: Spec) -> str:
        """Create and start; on failure remove what was created and say why, naming the port."""
        created = self.client.api.create_container(
            image=spec.image, name=spec.name, labels=spec.labels, environment=spec.env,
            ports=[(int(p.split("/")[0]), p.split("/")[1]) for p in spec.ports],
            stop_timeout=spec.stop_timeout,
            host_config=self.client.api.create_host_config(
                port_bindings=spec.ports, binds=list(spec.binds), sysctls=spec.sysctls or None,
                network_mode=spec.network_mode, privileged=spec.privileged,
                restart_policy={"Name": "unless-stopped"}))
        container_id = created["Id"]
        try:
            self.client.api.start(container_id)
        except self._errors.APIError as err:
            self.client.api.remove_container(container_id, force=True, v=True)
            raise _start_error(err, spec) from err
        return container_id

    def start(self, container_id: str) -> None:
        self.client.api.start(container_id)

    def stop(self, container_id: str, timeout: int) -> None:
        self.client.api.stop(container_id, timeout=timeout)

    def rename(self, container_id: str, name: str) -> None:
        self.client.api.rename(container_id, name)

    def remove(self, container_id: str) -> None:
        self.client.api.remove_container(container_id, force=True, v=True)

    def recover(self, name: str) -> None:
        """Finish a replacement the agent was killed in the middle of (see plan_recovery)."""
        asides = {item.name: Observed(item.id, item.status, dict(item.labels or {}))
                  for item in self.client.containers.list(
                      all=True, filters={"name": f"{name}-previous-"})
                  if item.name.startswith(f"{name}-previous-")}
        restore, remove = plan_recovery(self.find(name), asides)
        if restore:
            log.warning("container.restored_aside", name=restore, to=name,
                        why="a replacement was cut off before the new Quay was created")
            self.rename(asides[restore].id, name)
        for aside in remove:
            log.info("container.remove_stale", name=aside)
            self.remove(asides[aside].id)

    def restart_quay(self, spec: Spec, recreate: bool, exited: bool,
                     expect: Callable[[Tuple[str, ...]], None]) -> Optional[str]:
        """Carry out the watchdog's restart as plan_restart decides; `expect` hears the Docker
        events the act will echo before it acts. Returns the new container's id when one was
        created."""
        found = self.find(spec.name)
        kind, echoes = plan_restart(found, recreate, exited)
        if kind == "refuse":
            log.error("container.not_ours", name=spec.name,
                      hint="a container quay-bootstrap did not create took Quay's name; it is "
                           "left alone. Remove it, then restart quay-bootstrap")
            return None
        if kind == "none":
            log.info("container.restarted_by_docker", name=spec.name)
            return None
        expect(echoes)
        if kind in ("recreate", "create"):
            if found is not None:
                self.remove(found.id)
            return self.create_and_start(spec)
        if kind == "restart":
            self.client.api.restart(found.id, timeout=spec.stop_timeout)
        else:
            self.start(found.id)
        return None

    def stop_quay(self, spec: Spec) -> None:
        """Stop Quay gracefully, if the container under its name is ours."""
        found = self.find(spec.name)
        if found is not None and found.labels.get(MANAGED) == "true":
            self.stop(found.id, spec.stop_timeout)

    def age(self, container_id: str) -> float:
        """Seconds since the container started (0 when unknown), so an adopted Quay is not
        given a fresh start period."""
        try:
            text = self.client.api.inspect_container(container_id)["State"]["StartedAt"]
            match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?", text)
            started = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(
                tzinfo=datetime.timezone.utc).timestamp() + float(match.group(2) or 0)
        except Exception:  # noqa: BLE001 - unknown: a full start period
            return 0.0
        return max(time.time() - started, 0.0)

    def watch(self, name: str, stop, on_event: Callable[[str, Optional[int]], None]) -> None:
        """A thread's loop: calls `on_event(action, exit code)` for each of the container's die,
        start and destroy events, as Docker streams them (a die is seen within milliseconds,
        no polling). Reconnects when dockerd restarts; the loss is logged once, not every
        second."""
        from quay_bootstrap.periodic import Warnings

        lost = Warnings("docker.events_lost")
        while not stop.is_set():
            try:
                for event in self.client.events(
                        decode=True, filters={"type": "container", "container": name}):
                    lost.ok()
                    action = event.get("status") or event.get("Action")
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    if attributes.get("name") == name and action in ("die", "start", "destroy"):
                        code = attributes.get("exitCode")
                        on_event(action, int(code) if code else None)
            except Exception as err:  # noqa: BLE001 - dockerd went away: reconnect
                lost.warn(err)
            stop.wait(1.0)

    def running(self, container_id: str) -> bool:
        try:
            return self.client.api.inspect_container(container_id)["State"]["Running"]
        except self._errors.NotFound:
            return False


def _start_error(err: Exception, spec: Spec) -> ContainerError:
    text = str(getattr(err, "explanation", None) or err)
    match = _PORT_IN_USE.search(text)
    if match or "port is already allocated" in text or "address already in use" in text:
        port = match.group(1) if match else "?"
        return ContainerError(f"the host port {port} is already in use, so the Quay container "
                              "cannot start", where=f"container {spec.name}",
                              hint="Stop what listens there (ss -ltnp) or change "
                                   "container.ports")
    return ContainerError(f"Docker could not start the Quay container: {text}",
                          where=f"container {spec.name}")


def _default_socket() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")


def _client_without_user_config(docker, base_url: Optional[str]):
    """A client that never reads (or later writes) ~/.docker/config.json: the SDK reads the
    config once, at construction, from $DOCKER_CONFIG first, so point that at an empty one."""
    folder = tempfile.mkdtemp(prefix="quay-bootstrap-docker-")
    saved = os.environ.get("DOCKER_CONFIG")
    try:
        Path(folder, "config.json").write_text("{}")
        os.environ["DOCKER_CONFIG"] = folder
        if base_url:
            return docker.DockerClient(base_url=base_url, version="auto", timeout=120)
        return docker.from_env(version="auto", timeout=120)
    finally:
        if saved is None:
            os.environ.pop("DOCKER_CONFIG", None)
        else:
            os.environ["DOCKER_CONFIG"] = saved
        shutil.rmtree(folder, ignore_errors=True)
