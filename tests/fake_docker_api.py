"""A fake of the Docker SDK's low-level client (`docker.APIClient`, a `DockerClient`'s `.api`),
for unit tests of quay_bootstrap.engine: the engine's own code runs, only dockerd is faked.

Modelled on docker-py's tests/unit/fake_api_client.py (a real `docker.DockerClient` whose `.api`
is replaced), but stateful: containers are kept as the JSON `docker inspect` shows (Id, Name,
State, RestartCount, Config, HostConfig), the events dockerd would stream are recorded, and the
answers are what dockerd gives (404 NotFound, 409 Conflict, a start refused over a taken port)
as the SDK turns them into exceptions. What dockerd does was taken from moby's source: a manual
start or restart resets RestartCount; the restart policy counts its restarts; a container in
the policy's back-off has no process, so stopping or restarting it echoes no die; a forced
remove of a live container echoes kill, die and destroy.

Every modelled method accepts exactly the arguments of the real APIClient method (a call the
SDK would refuse fails the same way here), and the request building that happens client-side
(create_container's body, create_host_config) is the SDK's own code. A method, argument or
filter the fake does not model fails the test, naming it: a new dependency on the Docker API
must be added here on purpose.
"""
from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import http
import inspect
import itertools
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Set, Tuple, Union

import docker
import requests
from docker.api.container import ContainerApiMixin

API_VERSION = docker.constants.DEFAULT_DOCKER_API_VERSION
IMAGE_ID = "sha256:" + hashlib.sha256(b"quay image").hexdigest()
NEVER = "0001-01-01T00:00:00Z"  # Go's zero time, as inspect shows a time that never happened
_RealDockerClient = docker.client.DockerClient  # tests patch docker.DockerClient itself
_NAME = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")  # moby's restrictedNamePattern
_DEFAULT_STOP_TIMEOUT = 10  # dockerd's, when neither the call nor the container names one


# --- what the SDK raises ----------------------------------------------------------------------

def api_error(status: int, message: str, path: str = "/") -> docker.errors.APIError:
    """The exception the SDK raises when dockerd answers `status` with `message` (NotFound or
    ImageNotFound for a 404, as docker.errors decides)."""
    response = requests.Response()
    response.status_code = status
    response.reason = http.HTTPStatus(status).phrase
    response.url = f"http+docker://localhost/v{API_VERSION}{path}"
    response._content = json.dumps({"message": message}).encode()
    try:
        docker.errors.create_api_error_from_http_exception(
            requests.exceptions.HTTPError(response=response))
    except docker.errors.APIError as err:
        return err
    raise AssertionError("create_api_error_from_http_exception did not raise")


def daemon_down() -> docker.errors.DockerException:
    """What `docker.from_env(version="auto")` raises when nothing listens on the socket."""
    return docker.errors.DockerException(
        "Error while fetching server API version: ('Connection aborted.', "
        "FileNotFoundError(2, 'No such file or directory'))")


# --- the fake ---------------------------------------------------------------------------------

@dataclass
class Connection:
    """One construction of a docker client: which constructor, its arguments, and the
    $DOCKER_CONFIG folder and config.json text the SDK would have read then."""

    via: str  # "from_env" or "DockerClient"
    kwargs: Dict[str, Any]
    docker_config: Optional[str]
    config_json: Optional[str]


@dataclass
class _Process:
    """What dockerd knows of a container that inspect does not show."""

    logs: bytes = b""
    stops_in: float = 0.0  # seconds its process takes to exit on SIGTERM
    created: int = 0  # creation order, for `docker ps` (newest first)


def _api(method: Callable) -> Callable:
    """A modelled APIClient method: the call must bind to the real method's signature; it is
    recorded in `calls`; a failure queued with `fail` is raised before anything changes."""
    real = inspect.signature(getattr(docker.APIClient, method.__name__))

    @functools.wraps(method)
    def call(self: FakeAPIClient, *args, **kwargs):
        bound = real.bind(self, *args, **kwargs)  # a TypeError, as the real method gives
        bound.apply_defaults()
        self.calls.append((method.__name__, {k: v for k, v in bound.arguments.items()
                                             if k != "self"}))
        self._take_failure(method.__name__)
        return method(self, *args, **kwargs)

    return call


class FakeAPIClient:
    """dockerd behind the SDK's low-level client, in memory. Test controls: `add_container`
    (a container that was there before), `crash`, `come_back`, `fail`, `host_ports_in_use`,
    `image_ids`; views: `names`, `container`, `take_events`, `calls`, `connections`."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self.now = now
        self._version = API_VERSION
        self._containers: Dict[str, dict] = {}  # id -> inspect JSON
        self._processes: Dict[str, _Process] = {}
        self._events: List[dict] = []
        self._streamed = 0  # events before this index went to an earlier stream
        self._failures: Dict[str, List[BaseException]] = {}
        self._ids = itertools.count(1)
        self._sdk: Optional[docker.APIClient] = None  # the real client a connect built
        self.calls: List[Tuple[str, Dict[str, Any]]] = []
        self.connections: List[Connection] = []
        self.image_ids: Dict[str, str] = {}  # reference -> image ID (IDs themselves always resolve)
        self.image_cmd: List[str] = ["registry"]  # the image's CMD (Quay's entry point)
        self.host_ports_in_use: Set[int] = set()  # held by processes outside Docker
        self.legacy_event_fields = True  # events carry status/id/from as well as Action/Actor

    # -- test controls -------------------------------------------------------------------------

    def fail(self, method: str, error: BaseException, times: int = 1) -> None:
        """The next `times` calls of `method` ("connect" for a client's construction) raise
        `error` before doing anything."""
        self._failures.setdefault(method, []).extend([error] * times)

    def add_container(self, name: str, *, status: str = "running",
                      labels: Optional[Dict[str, str]] = None, image: str = IMAGE_ID,
                      restart_policy: str = "unless-stopped", restart_count: int = 0,
                      started_at: Optional[float] = None, exit_code: int = 0,
                      ports: Optional[Dict[str, int]] = None, logs: Union[str, bytes] = "",
                      stops_in: float = 0.0) -> str:
        """A container that was there before the test (no events): `status` one of created,
        running, paused, restarting, exited, dead; `ports` {"8443/tcp": 443}."""
        started = self.now() - 60 if started_at is None else started_at
        attrs = self._new(name, {
            "Image": image, "Cmd": None, "Env": [], "Labels": dict(labels or {}),
            "ExposedPorts": {port: {} for port in ports or {}}, "StopTimeout": None,
            "Tty": False, "Entrypoint": None,
            "HostConfig": {"NetworkMode": "default", "RestartPolicy": {"Name": restart_policy},
                           "PortBindings": {port: [{"HostIp": "", "HostPort": str(host)}]
                                            for port, host in (ports or {}).items()}}})
        state = attrs["State"]
        if status != "created":
            state["StartedAt"] = _timestamp(started)
        live = status in ("running", "paused", "restarting")
        state.update(Status=status, Running=live, Paused=status == "paused",
                     Restarting=status == "restarting", Dead=status == "dead",
                     Pid=4242 if status in ("running", "paused") else 0, ExitCode=exit_code)
        if status in ("exited", "dead"):
            state["FinishedAt"] = _timestamp(self.now())
        attrs["RestartCount"] = restart_count
        self._processes[attrs["Id"]].logs = logs.encode() if isinstance(logs, str) else logs
        self._processes[attrs["Id"]].stops_in = stops_in
        return attrs["Id"]

    def crash(self, ref: str, exit_code: int = 255, come_back: bool = True) -> None:
        """The container's process exits on its own; its restart policy decides what follows:
        Docker counts a restart and (with `come_back`) starts it again, else it is left in the
        back-off ("restarting", no process) until `come_back`."""
        attrs = self._resolve(ref)
        assert self._has_process(attrs), f"crash: {attrs['Name']} has no process"
        state = attrs["State"]
        policy = attrs["HostConfig"]["RestartPolicy"]["Name"]
        restart = policy in ("always", "unless-stopped") or (
            policy == "on-failure" and exit_code != 0)
        self._emit(attrs, "die", exitCode=str(exit_code))
        state.update(ExitCode=exit_code, Pid=0, FinishedAt=_timestamp(self.now()))
        if not restart:
            state.update(Status="exited", Running=False)
            return
        attrs["RestartCount"] += 1
        state.update(Status="restarting", Running=True, Restarting=True)
        if come_back:
            self.come_back(ref)

    def come_back(self, ref: str) -> None:
        """The restart policy's back-off ended: the container runs again."""
        attrs = self._resolve(ref)
        assert attrs["State"]["Restarting"], f"come_back: {attrs['Name']} is not restarting"
        self._run(attrs)

    def names(self) -> Dict[str, str]:
        """What `docker ps -a` shows: each container's name and status."""
        return {a["Name"][1:]: a["State"]["Status"] for a in self._containers.values()}

    def container(self, ref: str) -> Optional[dict]:
        """`docker inspect REF` (a name or an ID), or None when there is none."""
        try:
            return copy.deepcopy(self._resolve(ref))
        except docker.errors.NotFound:
            return None

    def take_events(self) -> List[dict]:
        """The events since the last stream or take (a later stream will not repeat them)."""
        taken, self._streamed = self._events[self._streamed:], len(self._events)
        return copy.deepcopy(taken)

    def connect(self, via: str, kwargs: Dict[str, Any]) -> docker.DockerClient:
        """Stands in for docker.from_env / docker.DockerClient (see `install`): builds the real
        DockerClient with the same arguments (the API version pinned instead of asked for, so
        nothing is contacted), so the SDK reads its config as it would, then puts this fake
        in as its `.api`."""
        folder = os.environ.get("DOCKER_CONFIG")
        config = Path(folder, "config.json") if folder else None
        self.connections.append(Connection(
            via, dict(kwargs), folder,
            config.read_text() if config is not None and config.exists() else None))
        self._take_failure("connect")
        pinned = {**kwargs, "version": API_VERSION}
        client = (_RealDockerClient.from_env(**pinned) if via == "from_env"
                  else _RealDockerClient(**pinned))
        self._sdk = client.api
        client.api.close()
        client.api = self
        return client

    # -- what the SDK reads of its client besides the API calls ------------------------------

    @property
    def _auth_configs(self):
        return self._sdk._auth_configs if self._sdk is not None else None

    @_auth_configs.setter
    def _auth_configs(self, value) -> None:
        assert self._sdk is not None, "no client was connected"
        self._sdk._auth_configs = value

    @property
    def credstore_env(self):
        return self._sdk.credstore_env if self._sdk is not None else None

    @property
    def _proxy_configs(self):
        if self._sdk is not None:
            return self._sdk._proxy_configs
        return docker.utils.proxy.ProxyConfig()

    # -- the low-level API: what the SDK builds client-side is the SDK's own code -------------

    create_host_config = ContainerApiMixin.create_host_config
    create_container_config = ContainerApiMixin.create_container_config

    @_api
    def create_container(self, *args, **kwargs) -> dict:
        return ContainerApiMixin.create_container(self, *args, **kwargs)

    # -- the low-level API: dockerd's side ---------------------------------------------------

    @_api
    def ping(self) -> bool:
        return True

    @_api
    def create_container_from_config(self, config, name=None, platform=None) -> dict:
        """POST /containers/create."""
        assert platform is None, "create_container(platform=...) is not modelled"
        path = f"/containers/create?name={name}"
        if name is None:
            name = f"fake_name_{next(self._ids)}"
        if not _NAME.match(name):
            raise api_error(400, f"Invalid container name ({name}), only "
                                 "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed", path)
        self._refuse_taken_name(name, path)
        image = config["Image"]
        image_id = image if image.startswith("sha256:") else self.image_ids.get(image)
        if image_id is None:
            raise api_error(404, f"No such image: {image}", path)
        host = copy.deepcopy(config.get("HostConfig") or {})
        host.setdefault("NetworkMode", "default")
        host["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0,
                                 **(host.get("RestartPolicy") or {})}
        attrs = self._new(name, {
            "Image": image, "Cmd": config.get("Cmd"), "Env": config.get("Env") or [],
            "Labels": dict(config.get("Labels") or {}),
            "ExposedPorts": config.get("ExposedPorts") or {},
            "StopTimeout": config.get("StopTimeout"), "Tty": bool(config.get("Tty")),
            "Entrypoint": config.get("Entrypoint"), "HostConfig": host}, image_id)
        self._emit(attrs, "create")
        return {"Id": attrs["Id"], "Warnings": []}

    @_api
    def inspect_container(self, container) -> dict:
        return copy.deepcopy(self._resolve(container, "/json"))

    @_api
    def containers(self, quiet=False, all=False, trunc=False, latest=False, since=None,
                   before=None, limit=-1, size=False, filters=None) -> List[dict]:
        """GET /containers/json: newest first; the `name` filter is a regular expression
        searched for in "/NAME", as dockerd does (so it matches names that only contain it)."""
        given = (quiet, trunc, latest, since, before, limit, size)
        assert given == (False, False, False, None, None, -1, False), \
            f"containers(quiet, trunc, latest, since, before, limit, size={given}) is not modelled"
        filters = dict(filters or {})
        patterns = _as_list(filters.pop("name", []))
        assert not filters, f"containers(filters={filters}) is not modelled"
        found = []
        for attrs in sorted(self._containers.values(),
                            key=lambda a: -self._processes[a["Id"]].created):
            if not all and not attrs["State"]["Running"]:
                continue
            if patterns and not any(re.search(p, attrs["Name"]) for p in patterns):
                continue
            found.append({
                "Id": attrs["Id"], "Names": [attrs["Name"]], "Image": attrs["Config"]["Image"],
                "ImageID": attrs["Image"], "Labels": dict(attrs["Config"]["Labels"] or {}),
                "State": attrs["State"]["Status"], "Status": attrs["State"]["Status"]})
        return found

    @_api
    def start(self, container, *args, **kwargs) -> None:
        if args or kwargs:
            raise docker.errors.DeprecatedMethod("Providing configuration in the start() "
                                                 "method is no longer supported.")
        attrs = self._resolve(container, "/start")
        if attrs["State"]["Paused"]:
            raise api_error(409, "cannot start a paused container, try unpause instead",
                            f"/containers/{container}/start")
        if attrs["State"]["Running"]:
            return  # 304 Not Modified: the SDK returns quietly
        self._start(attrs)

    @_api
    def stop(self, container, timeout=None) -> None:
        attrs = self._resolve(container, "/stop")
        if attrs["State"]["Running"]:
            self._stop(attrs, timeout)
            self._emit(attrs, "stop")
        # else 304 Not Modified

    @_api
    def restart(self, container, timeout=10) -> None:
        attrs = self._resolve(container, "/restart")
        if attrs["State"]["Running"]:
            self._stop(attrs, timeout)
            self._emit(attrs, "stop")
        self._start(attrs)
        self._emit(attrs, "restart")

    @_api
    def rename(self, container, name) -> None:
        path = f"/containers/{container}/rename?name={name}"
        attrs = self._resolve(container, "/rename")
        if not _NAME.match(name):
            raise api_error(400, f"Invalid container name ({name}), only "
                                 "[a-zA-Z0-9][a-zA-Z0-9_.-] are allowed", path)
        old = attrs["Name"]
        if old == "/" + name.lstrip("/"):
            raise api_error(400, "Renaming a container with the same name as its current "
                                 "name", path)
        self._refuse_taken_name(name, path)
        attrs["Name"] = "/" + name.lstrip("/")
        self._emit(attrs, "rename", oldName=old)

    @_api
    def remove_container(self, container, v=False, link=False, force=False) -> None:
        assert not link, "remove_container(link=True) is not modelled"
        path = f"/containers/{container}?v={v}&link={link}&force={force}"
        attrs = self._resolve(container, "")
        state = attrs["State"]
        if state["Running"] and not force:
            what = "restarting" if state["Restarting"] else "running"
            raise api_error(409, f"You cannot remove a {what} container {attrs['Id']}. Stop "
                                 "the container before attempting removal or force remove",
                            path)
        if state["Running"]:
            self._kill(attrs, 9)
        del self._containers[attrs["Id"]]
        self._emit(attrs, "destroy")

    @_api
    def update_container(self, container, blkio_weight=None, cpu_period=None, cpu_quota=None,
                         cpu_shares=None, cpuset_cpus=None, cpuset_mems=None, mem_limit=None,
                         mem_reservation=None, memswap_limit=None, kernel_memory=None,
                         restart_policy=None) -> dict:
        others = {k: v for k, v in locals().items()
                  if k not in ("self", "container", "restart_policy") and v is not None}
        assert not others, f"update_container({others}) is not modelled"
        attrs = self._resolve(container, "/update")
        if restart_policy:
            attrs["HostConfig"]["RestartPolicy"] = {"MaximumRetryCount": 0, **restart_policy}
        self._emit(attrs, "update")
        return {"Warnings": None}

    @_api
    def logs(self, container, stdout=True, stderr=True, stream=False, timestamps=False,
             tail="all", since=None, follow=None, until=None) -> bytes:
        assert not (stream or follow or timestamps or since or until), \
            "logs(stream/follow/timestamps/since/until) is not modelled"
        attrs = self._resolve(container, "/logs")
        if not (stdout or stderr):
            return b""
        lines = self._processes[attrs["Id"]].logs.splitlines(keepends=True)
        if tail != "all":
            lines = lines[-int(tail):] if int(tail) > 0 else []
        return b"".join(lines)

    @_api
    def events(self, since=None, until=None, filters=None, decode=None) -> Iterator[dict]:
        """GET /events: the events since the last stream ended (as if this stream had been
        connected all along), or with `since` ("seconds.nanoseconds"), every event from then on
        (inclusive, as dockerd's buffer answers); then the stream ends, as when dockerd stops.
        The `container` filter matches an ID or a name that starts with it, as moby's
        FuzzyMatch does."""
        assert until is None, "events(until) is not modelled"
        assert decode is True, "events(decode=False), raw bytes, is not modelled"
        filters = dict(filters or {})
        types = _as_list(filters.pop("type", []))
        wanted = _as_list(filters.pop("container", []))
        assert not filters, f"events(filters={filters}) is not modelled"

        if since is not None:
            whole, _, nanos = str(since).partition(".")
            since_ns = int(whole) * 1_000_000_000 + int(nanos.ljust(9, "0")[:9])
            self._streamed = next((i for i, e in enumerate(self._events)
                                   if e["timeNano"] >= since_ns), len(self._events))

        def stream() -> Iterator[dict]:
            while self._streamed < len(self._events):
                event = self._events[self._streamed]
                self._streamed += 1
                actor = event["Actor"]
                if types and event["Type"] not in types:
                    continue
                if wanted and not any(actor["ID"].startswith(w)
                                      or actor["Attributes"].get("name", "").startswith(w)
                                      for w in wanted):
                    continue
                yield copy.deepcopy(event)

        return stream()

    # -- anything else -----------------------------------------------------------------------

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        raise AssertionError(f"unexpected call: client.api.{name} is not modelled by "
                             "FakeAPIClient (tests/fake_docker_api.py); add it on purpose")

    # -- internals -----------------------------------------------------------------------------

    def _take_failure(self, method: str) -> None:
        pending = self._failures.get(method)
        if pending:
            raise pending.pop(0)

    def _new(self, name: str, config: Dict[str, Any], image_id: Optional[str] = None) -> dict:
        number = next(self._ids)
        container_id = hashlib.sha256(f"container {number}".encode()).hexdigest()
        host = config.pop("HostConfig")
        image = config["Image"]
        if config["Cmd"] is None:
            config["Cmd"] = list(self.image_cmd)
        attrs = {
            "Id": container_id, "Created": _timestamp(self.now()),
            "Path": (config.get("Entrypoint") or config["Cmd"])[0],
            "Args": (config.get("Entrypoint") or config["Cmd"])[1:],
            "State": {"Status": "created", "Running": False, "Paused": False,
                      "Restarting": False, "OOMKilled": False, "Dead": False, "Pid": 0,
                      "ExitCode": 0, "Error": "", "StartedAt": NEVER, "FinishedAt": NEVER},
            "Image": image_id or (image if image.startswith("sha256:") else IMAGE_ID),
            "Name": "/" + name.lstrip("/"), "RestartCount": 0, "HostConfig": host,
            "Config": config,
        }
        self._containers[container_id] = attrs
        self._processes[container_id] = _Process(created=number)
        return attrs

    def _resolve(self, ref, suffix: str = "") -> dict:
        """dockerd's lookup: a full ID, a name, then a unique ID prefix."""
        if isinstance(ref, dict):
            ref = ref.get("Id", ref.get("ID"))
        if not ref:
            raise docker.errors.NullResource("Resource ID was not provided")
        if ref in self._containers:
            return self._containers[ref]
        for attrs in self._containers.values():
            if attrs["Name"] == "/" + ref.lstrip("/"):
                return attrs
        prefixed = [a for i, a in self._containers.items() if i.startswith(ref)]
        if len(prefixed) == 1:
            return prefixed[0]
        raise api_error(404, f"No such container: {ref}", f"/containers/{ref}{suffix}")

    def _refuse_taken_name(self, name: str, path: str) -> None:
        for attrs in self._containers.values():
            if attrs["Name"] == "/" + name.lstrip("/"):
                raise api_error(409, f'Conflict. The container name "/{name.lstrip("/")}" is '
                                     f'already in use by container "{attrs["Id"]}". You have to '
                                     "remove (or rename) that container to be able to reuse "
                                     "that name.", path)

    @staticmethod
    def _has_process(attrs: dict) -> bool:
        state = attrs["State"]
        return state["Running"] and not state["Restarting"]

    def _start(self, attrs: dict) -> None:
        """A start asked for (docker start/restart): publishes the ports, resets RestartCount."""
        path = f"/containers/{attrs['Id']}/start"
        name = attrs["Name"][1:]
        host = attrs["HostConfig"]
        bindings = {} if host.get("NetworkMode") == "host" else host.get("PortBindings") or {}
        for binds in bindings.values():
            for bind in binds:
                ip, port = bind.get("HostIp") or "0.0.0.0", int(bind["HostPort"])
                prefix = (f"driver failed programming external connectivity on endpoint {name} "
                          f"({attrs['Id']}): ")
                if self._port_owner(port, ip, attrs["Id"]):
                    self._refused(attrs, api_error(
                        500, prefix + f"Bind for {ip}:{port} failed: port is already allocated",
                        path))
                if port in self.host_ports_in_use:
                    self._refused(attrs, api_error(
                        500, prefix + f"Error starting userland proxy: listen tcp4 {ip}:{port}: "
                                      "bind: address already in use", path))
        attrs["RestartCount"] = 0
        self._run(attrs)

    def _refused(self, attrs: dict, err: docker.errors.APIError) -> None:
        state = attrs["State"]
        state.update(Error=err.explanation, ExitCode=128)
        if state["StartedAt"] != NEVER:
            state["Status"] = "exited"
        raise err

    def _port_owner(self, port: int, ip: str, other_than: str) -> Optional[str]:
        for attrs in self._containers.values():
            if attrs["Id"] == other_than or not self._has_process(attrs):
                continue
            for binds in (attrs["HostConfig"].get("PortBindings") or {}).values():
                for bind in binds:
                    held = bind.get("HostIp") or "0.0.0.0"
                    if int(bind["HostPort"]) == port and (held == ip or "0.0.0.0" in (held, ip)):
                        return attrs["Id"]
        return None

    def _run(self, attrs: dict) -> None:
        attrs["State"].update(Status="running", Running=True, Paused=False, Restarting=False,
                              Dead=False, Pid=4242, ExitCode=0, Error="",
                              StartedAt=_timestamp(self.now()))
        self._emit(attrs, "start")

    def _stop(self, attrs: dict, timeout: Optional[int]) -> None:
        """SIGTERM, SIGKILL after the grace period; a container in its back-off has no process
        to signal (moby's killWithSignal returns early): no kill, no die."""
        state = attrs["State"]
        if state["Restarting"]:
            state.update(Status="exited", Running=False, Restarting=False)
            return
        grace = timeout if timeout is not None else (
            attrs["Config"].get("StopTimeout") or _DEFAULT_STOP_TIMEOUT)
        self._emit(attrs, "kill", signal="15")
        if self._processes[attrs["Id"]].stops_in <= grace:
            self._exit(attrs, 0)
        else:
            self._kill(attrs, 9)

    def _kill(self, attrs: dict, signal: int) -> None:
        if attrs["State"]["Restarting"]:
            attrs["State"].update(Status="exited", Running=False, Restarting=False)
            return
        self._emit(attrs, "kill", signal=str(signal))
        self._exit(attrs, 128 + signal)

    def _exit(self, attrs: dict, code: int) -> None:
        attrs["State"].update(Status="exited", Running=False, Paused=False, Restarting=False,
                              Pid=0, ExitCode=code, FinishedAt=_timestamp(self.now()))
        self._emit(attrs, "die", exitCode=str(code))

    def _emit(self, attrs: dict, action: str, **extra: str) -> None:
        now = self.now()
        image = attrs["Config"]["Image"]
        event = {"Type": "container", "Action": action,
                 "Actor": {"ID": attrs["Id"],
                           "Attributes": {**(attrs["Config"]["Labels"] or {}), "image": image,
                                          "name": attrs["Name"][1:], **extra}},
                 "scope": "local", "time": int(now), "timeNano": int(now * 1e9)}
        if self.legacy_event_fields:
            event.update(status=action, id=attrs["Id"], **{"from": image})
        self._events.append(event)


_CONTROLS = ("fail", "add_container", "crash", "come_back", "names", "container",
             "take_events", "connect", "now", "calls", "connections", "image_ids", "image_cmd",
             "host_ports_in_use", "legacy_event_fields")
# A control named like an APIClient attribute would answer a real call silently.
assert not [n for n in _CONTROLS if hasattr(docker.APIClient, n)], "rename the control"


def install(monkeypatch, api: FakeAPIClient) -> FakeAPIClient:
    """Every docker client made while the test runs (docker.from_env, docker.DockerClient)
    is a real DockerClient over `api`."""
    monkeypatch.setattr(docker, "from_env", lambda **kwargs: api.connect("from_env", kwargs))
    monkeypatch.setattr(docker, "DockerClient",
                        lambda **kwargs: api.connect("DockerClient", kwargs))
    return api


def make_fake_client(api: Optional[FakeAPIClient] = None) -> docker.DockerClient:
    """docker-py's make_fake_client: a real DockerClient whose `.api` is the fake."""
    return (api or FakeAPIClient()).connect("DockerClient", {})


def _as_list(value) -> List[str]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _timestamp(seconds: float) -> str:
    """Go's RFC 3339 with nanoseconds, as dockerd writes StartedAt (trailing zeros dropped)."""
    nanos = round(seconds * 1e9)
    whole, fraction = divmod(nanos, 1_000_000_000)
    text = datetime.datetime.fromtimestamp(whole, datetime.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S")
    digits = f"{fraction:09d}".rstrip("0")
    return f"{text}.{digits}Z" if digits else f"{text}Z"


@dataclass
class StopAfter:
    """A threading.Event stand-in for Docker.watch's `stop`: set after `passes` waits, so the
    loop runs that many times without sleeping; `waited` holds the timeouts asked for."""

    passes: int = 1
    waited: List[float] = field(default_factory=list)

    def is_set(self) -> bool:
        return len(self.waited) >= self.passes

    def wait(self, timeout: Optional[float] = None) -> bool:
        self.waited.append(timeout)
        return self.is_set()
