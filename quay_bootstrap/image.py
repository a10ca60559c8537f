"""Getting the locked image onto the node: registry credentials, pull with retries, digest check."""
from __future__ import annotations

import base64
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import structlog
import tenacity

from quay_bootstrap.errors import ConfigError, ImageError, LockViolation, TransientError, Unavailable
from quay_bootstrap.lock import ImageRef

log = structlog.get_logger(__name__)

# What a registry's permanent "no" looks like inside dockerd's error text.
_PERMANENT = ("unauthorized", "authentication required", "denied", "forbidden",
              "manifest unknown", "not found", "no such image", "invalid reference",
              "incorrect username or password")


@dataclass(frozen=True)
class Image:
    id: str
    digest: str  # repo@sha256:... as the registry serves it, or the image ID for a local image
    pulled: bool


def registry_auth(auth, registry: str, add_secret: Callable = lambda values: None,
                  ecr_client: Optional[Callable] = None) -> Optional[Dict[str, str]]:
    """Credentials for one pull, never from or to ~/.docker/config.json.

    Raises:
        ConfigError: the password file is missing, empty, or readable by everyone.
    """
    if auth is None:
        return None
    if auth.ecr:
        client = ecr_client() if ecr_client else _ecr_client(registry)
        token = client.get_authorization_token()["authorizationData"][0]["authorizationToken"]
        username, _, password = base64.b64decode(token).decode().partition(":")
        add_secret([password, token])
        return {"username": username, "password": password}
    path = Path(auth.password_file)
    try:
        mode = path.stat().st_mode
        password = path.read_text().strip()
    except OSError as err:
        raise ConfigError(f"cannot read the registry password file: {err.strerror}",
                          where=str(path), hint="Write it (mode 0600) or fix "
                                                "image.auth.password_file") from err
    if mode & stat.S_IROTH:
        raise ConfigError("the registry password file is readable by every user", where=str(path),
                          hint=f"chmod 600 {path}")
    if not password:
        raise ConfigError("the registry password file is empty", where=str(path))
    add_secret([password])
    return {"username": auth.username, "password": password}


def _ecr_client(registry: str):
    from quay_bootstrap import aws_session

    # 123456789012.dkr.ecr.us-east-1.amazonaws.com: the region is the fourth label.
    labels = registry.split(".")
    region = labels[3] if len(labels) > 4 and labels[1] == "dkr" else None
    return aws_session.client("ecr", region_name=region)


def ensure_image(docker, ref: ImageRef, *, auth: Optional[Dict[str, str]], deadline: float,
                 sleep: Callable[[float], None] = time.sleep) -> Image:
    """The image `ref` names, pulled only when it is not here yet, its digest verified.

    Raises:
        LockViolation: the registry serves another digest than the pinned one (exit 65).
        ImageError: the registry refused for good (unauthorized, unknown tag).
        Unavailable: the registry did not answer within `deadline` seconds (exit 69).
    """
    local = _local(docker, ref)
    if local:
        log.debug("image.present", image=str(ref), id=local.id)
        return local
    give_up_at = time.monotonic() + deadline
    try:
        for attempt in tenacity.Retrying(
                retry=tenacity.retry_if_exception_type(TransientError),
                stop=lambda state: time.monotonic() >= give_up_at,
                wait=tenacity.wait_random_exponential(multiplier=1, max=30),
                sleep=sleep, reraise=True,
                before_sleep=lambda s: log.warning("image.pull_retry", image=str(ref),
                                                   attempt=s.attempt_number,
                                                   error=str(s.outcome.exception()))):
            with attempt:
                _pull(docker, ref, auth)
    except TransientError as err:
        raise Unavailable(f"the registry did not answer within {deadline:.0f}s: {err}",
                          where=ref.registry, hint="Check the network path to the registry; "
                          "the running Quay was left as it was") from err
    image = docker.client.images.get(f"{ref.repository}:{ref.tag}")
    digest = _repo_digest(image, ref)
    if ref.digest and digest != f"{ref.repository}@{ref.digest}":
        raise LockViolation(f"the registry serves {ref.repository}:{ref.tag} as "
                            f"{(digest or '?').rpartition('@')[2]}, not the pinned {ref.digest}",
                            where=str(ref), hint="The tag was re-pushed: check the image, then "
                            "update the pinned digest (or the cluster lock) on purpose")
    return Image(image.id, digest or image.id, True)


def _local(docker, ref: ImageRef) -> Optional[Image]:
    import docker as sdk

    try:
        image = docker.client.images.get(ref.pull_name)
    except sdk.errors.ImageNotFound:
        return None
    except sdk.errors.APIError:
        return None
    digest = _repo_digest(image, ref)
    if ref.digest and digest != f"{ref.repository}@{ref.digest}":
        return None
    return Image(image.id, digest or image.id, False)


def _repo_digest(image, ref: ImageRef) -> Optional[str]:
    for item in image.attrs.get("RepoDigests") or []:
        if item.partition("@")[0] == ref.repository:
            return item
    return None


LAYER_DONE = ("Pull complete", "Already exists", "Download complete")


def _pull(docker, ref: ImageRef, auth: Optional[Dict[str, str]]) -> None:
    import docker as sdk

    started = time.monotonic()
    layers: set = set()
    try:
        for event in docker.client.api.pull(ref.repository, tag=ref.tag, stream=True,
                                            decode=True, auth_config=auth):
            if "error" in event:
                _raise_for(event["error"], ref)
            status = event.get("status", "")
            # Once per layer: dockerd ends each with "Pull complete" (or "Already exists"),
            # podman's compat API with "Download complete" (it says nothing after that).
            if status in LAYER_DONE and event.get("id") not in layers:
                layers.add(event.get("id"))
                log.info("image.layer", image=str(ref), layer=event.get("id"), status=status)
    except sdk.errors.APIError as err:
        _raise_for(str(err.explanation or err), ref, err)
    except (sdk.errors.DockerException, OSError) as err:
        raise TransientError(str(err)) from err
    log.info("image.pulled", image=str(ref), layers=len(layers),
             seconds=round(time.monotonic() - started, 3))


def _raise_for(text: str, ref: ImageRef, cause: Optional[Exception] = None) -> None:
    lowered = text.lower()
    if "no space left on device" in lowered:
        raise ImageError(f"the disk filled up while pulling {ref}: {text}", where="dockerd",
                         hint="Free space under Docker's data root (docker system prune, a "
                              "bigger disk); the running Quay was left as it was") from cause
    if any(word in lowered for word in _PERMANENT):
        hint = ("Check image.auth (username and password_file, or ecr: true)"
                if any(w in lowered for w in ("unauthorized", "authentication", "denied",
                                              "incorrect username"))
                else "Check that the tag exists in the registry")
        raise ImageError(f"the registry refused to serve {ref.repository}:{ref.tag}: {text}",
                         where=ref.registry, hint=hint) from cause
    raise TransientError(text) from cause
