"""The Docker engine, through the docker SDK: the Quay container created, restarted, recovered,
watched; a client that never reads ~/.docker/config.json."""
from __future__ import annotations

import datetime
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import structlog

from quay_bootstrap.container import MANAGED, Observed, Spec, plan_recovery, plan_restart
from quay_bootstrap.errors import ContainerError, Unavailable

log = structlog.get_logger(__name__)

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
            command=list(spec.command) if spec.command else None,
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

    def recover(self, name: str) -> bool:
        """Finish a replacement the agent was killed in the middle of (see plan_recovery);
        True when a container set aside was put back under `name`."""
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
        return restore is not None

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
            if text.startswith("0001-"):  # Go's zero time: never started
                return 0.0
            match = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?", text)
            started = datetime.datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(
                tzinfo=datetime.timezone.utc).timestamp() + float(match.group(2) or 0)
        except Exception:  # noqa: BLE001 - unknown: a full start period
            return 0.0
        return max(time.time() - started, 0.0)

    def watch(self, name: str, stop, on_event: Callable[[str, Optional[int], Optional[float]], None],
              resume: Optional["Resume"] = None) -> None:
        """A thread's loop: calls `on_event(action, exit code, when)` for each of the
        container's die, start and destroy events, as Docker streams them (a die is seen within
        milliseconds, no polling); `when` is Docker's own wall-clock time of it (None if it
        gives none). Streams from where `resume` is (kept by the caller, so a restarted thread
        goes on from there). Reconnects when dockerd restarts and resumes where the stream left
        off: a die while it was away is still told (dockerd keeps its last 256 events), none
        twice. The loss is logged once, not every second."""
        from quay_bootstrap.periodic import Warnings

        lost = Warnings("docker.events_lost")
        resume = resume or Resume()
        while not stop.is_set():
            try:
                for event in self.client.events(
                        decode=True, filters={"type": "container", "container": name},
                        **resume.params()):
                    lost.ok()
                    if not resume.new(event):
                        continue
                    action = event.get("status") or event.get("Action")
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    if attributes.get("name") == name and action in ("die", "start", "destroy"):
                        code = attributes.get("exitCode")
                        when = _nanos(event)
                        on_event(action, int(code) if code else None,
                                 None if when is None else when / 1e9)
            except Exception as err:  # noqa: BLE001 - dockerd went away: reconnect
                lost.warn(err)
            stop.wait(1.0)

    def leave_restarts_to_the_agent(self, container_id: str) -> bool:
        """No restart policy on a running Quay (no downtime): Docker would restart it with the
        entry point it was created with, which migrates, and the shared database is ahead.
        False where the engine cannot change a container's policy (podman 4's compat API has
        no update endpoint): the policy stays, and the agent says so."""
        try:
            self.client.api.update_container(container_id, restart_policy={"Name": "no"})
            return True
        except self._errors.NotFound:
            self.client.api.inspect_container(container_id)  # the container is gone: raises
            log.warning("container.restart_policy_kept", container=container_id[:12],
                        why="the engine has no container update endpoint (podman 4)",
                        note="if this Quay exits, the engine may start it again with the entry "
                             "point it was created with; the agent's watch still restarts it "
                             "without migrating")
            return False

    def logs(self, container_id: str, tail: int = 5000) -> str:
        """What Quay printed (its init scripts name each start-up phase)."""
        try:
            return self.client.api.logs(container_id, tail=tail).decode("utf-8", "replace")
        except self._errors.NotFound:
            return ""

    def running(self, container_id: str, restarts: Optional[int] = None) -> bool:
        """Running; with RESTARTS (an earlier `restart_count`), also not restarted by Docker's
        restart policy since: a Quay that exited and came back counts as exited (real Quay's
        failed migration, exit 255, otherwise looks like a slow start until start_period)."""
        try:
            found = self.client.api.inspect_container(container_id)
        except self._errors.NotFound:
            return False
        return bool(found["State"]["Running"]) and (
            restarts is None or (found.get("RestartCount") or 0) <= restarts)

    def restart_count(self, container_id: str) -> int:
        """How often Docker's restart policy has restarted the container (0 when it is gone)."""
        try:
            return self.client.api.inspect_container(container_id).get("RestartCount") or 0
        except self._errors.NotFound:
            return 0


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


def _no_credentials(docker):
    class NoCredentials(docker.auth.AuthConfig):
        """No credentials, and never empty, so the SDK never reloads the user's."""

        is_empty = False

        def __bool__(self) -> bool:
            return True

    return NoCredentials({})


def _client_without_user_config(docker, base_url: Optional[str]):
    """A client that never reads (or later writes) ~/.docker/config.json: the SDK reads the
    config once, at construction, from $DOCKER_CONFIG first, so point that at an empty one."""
    folder = tempfile.mkdtemp(prefix="quay-bootstrap-docker-")
    saved = os.environ.get("DOCKER_CONFIG")
    try:
        fd = os.open(Path(folder, "config.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write("{}")
        os.environ["DOCKER_CONFIG"] = folder
        client = (docker.DockerClient(base_url=base_url, version="auto", timeout=120)
                  if base_url else docker.from_env(version="auto", timeout=120))
        # The SDK reloads an empty in-memory auth config from disk on every pull without an
        # auth_config (docker.auth.get_config_header): one that is never empty stops that.
        client.api._auth_configs = _no_credentials(docker)
        return client
    finally:
        if saved is None:
            os.environ.pop("DOCKER_CONFIG", None)
        else:
            os.environ["DOCKER_CONFIG"] = saved
        shutil.rmtree(folder, ignore_errors=True)


class Resume:
    """Where a Docker event stream starts (again): `since`, wall-clock seconds, then just after
    the last event told. Docker's `since` is inclusive (nanoseconds), so the events already
    told at that very nanosecond are remembered and not told again."""

    def __init__(self, since: Optional[float] = None) -> None:
        self.at = None if since is None else int(since * 1e9)
        self.told: set = set()

    def params(self) -> dict:
        if self.at is None:
            return {}
        whole, nanos = divmod(self.at, 1_000_000_000)
        return {"since": f"{whole}.{nanos:09d}"}

    def new(self, event: dict) -> bool:
        """Whether EVENT is one not told before (and remember it)."""
        at = _nanos(event)
        if at is None:
            return True
        key = (at, event.get("id") or event.get("Actor", {}).get("ID"),
               event.get("status") or event.get("Action"))
        if key in self.told:
            return False
        if self.at is None or at > self.at:
            self.at, self.told = at, set()
        self.told.add(key)
        return True


def _nanos(event: dict) -> Optional[int]:
    """Docker's time of EVENT in nanoseconds since the epoch (`timeNano`, else `time`)."""
    if event.get("timeNano"):
        return int(event["timeNano"])
    return int(event["time"]) * 1_000_000_000 if event.get("time") else None
