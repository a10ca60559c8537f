"""How the Quay container runs: the desired spec and the reconcile decision (pure), and Docker (I/O)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import structlog

from quay_bootstrap.errors import ConfigError

log = structlog.get_logger(__name__)

LABEL = "io.quay-bootstrap"
MANAGED = f"{LABEL}.managed"
STACK_VERSION = f"{LABEL}.stack-version"
IMAGE_DIGEST = f"{LABEL}.image-digest"
SPEC_HASH = f"{LABEL}.spec-hash"
# container.stop_timeout's default before real Quay showed 19-38 s stops (digests of then).
LEGACY_STOP_TIMEOUT = 30
IMAGE_TAG = f"{LABEL}.image-tag"  # the release tag, to tell an older Quay from a newer one
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
    command: Optional[Tuple[str, ...]] = None  # None: the image's own (Quay's `registry`)

    def digest(self, stop_timeout: Optional[int] = None) -> str:
        """What makes a container this one. The stop timeout is not part of it (the agent passes
        its own on every stop; a new default must not replace every node's Quay): only an older
        agent's digests had one, given as STOP_TIMEOUT (`legacy_digests`)."""
        data = asdict(self)
        data.pop("labels")
        data.pop("stop_timeout")
        if stop_timeout is not None:
            data["stop_timeout"] = stop_timeout
        if self.command is None:
            data.pop("command")  # containers made before the field existed do not drift
        # The stack mount follows the stack version, which has a label of its own.
        data["binds"] = [b for b in self.binds if f":{STACK_MOUNT}:" not in b]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def legacy_digests(self) -> FrozenSet[str]:
        """The digests an older agent gave this container: with its stop timeout, either this
        spec's or that agent's default (30 s)."""
        return frozenset(self.digest(timeout) for timeout in {self.stop_timeout, LEGACY_STOP_TIMEOUT})


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
               stack_version: str, image_tag: str = "") -> Spec:
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
              IMAGE_TAG: image_tag, SPEC_HASH: spec.digest()}
    return replace(spec, labels=labels)


def with_entry_point(spec: Spec, entry: str) -> Spec:
    """`spec` started with Quay's entry point `entry` (`registry` is the image's own)."""
    command = None if entry == "registry" else (entry,)
    if command == spec.command:
        return spec
    changed = replace(spec, command=command)
    return replace(changed, labels={**spec.labels, SPEC_HASH: changed.digest()})


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
             if found.labels.get(label) != desired.labels[label]
             and not (label == SPEC_HASH and found.labels.get(label) in desired.legacy_digests())]
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
        # A forced remove of a paused container unpauses and kills it: a die too.
        gone = ("die", "destroy") if found.status in ("running", "paused") else ("destroy",)
        return "recreate", gone + ("start",)
    if found.status == "running" and exited:
        return "none", ()
    if found.status in ("running", "paused"):
        return "restart", ("die", "start")
    if found.status == "restarting":  # in Docker's back-off: no process to die
        return "restart", ("start",)
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
