"""The cluster's disruption budget: leases in the object store the cluster already has.

At most `rollout.max_unavailable` nodes replace their Quay container at the same time. A node
takes one of that many lease objects next to the stack with a conditional create (S3
`IfNoneMatch="*"`, GCS `if_generation_match=0`, O_EXCL on a directory), holds it with an expiry,
and deletes it when done; a node that dies mid-roll blocks the others only until its lease
expires, when the next node takes it over with a conditional overwrite of exactly what it read.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Tuple

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class LeaseBody:
    holder: str
    expires: float  # epoch seconds
    reason: str = ""

    def encode(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": self.expires,
                           "reason": self.reason}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Optional["LeaseBody"]:
        try:
            raw = json.loads(data.decode())
            return cls(str(raw["holder"]), float(raw["expires"]), str(raw.get("reason", "")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None  # unreadable: treated as expired, so it cannot block the cluster


def lease_prefix(stack_source: str) -> str:
    """Leases live beside the stack, never inside it: s3://b/conf/stack -> s3://b/conf/stack.rollout"""
    return stack_source.rstrip("/") + ".rollout"


def may_take(current: Optional[LeaseBody], me: str, now: float) -> bool:
    """Pure: whether a slot whose lease reads `current` can be taken by `me` at `now`."""
    return current is None or current.holder == me or current.expires <= now


class Store:
    """Conditional writes on one store. get -> (bytes, version token) or None; create and
    replace return False when someone else got there first."""

    def get(self, key: str) -> Optional[Tuple[bytes, str]]: ...
    def create(self, key: str, data: bytes) -> bool: ...
    def replace(self, key: str, data: bytes, token: str) -> bool: ...
    def delete(self, key: str) -> None: ...


class S3Store(Store):
    def __init__(self, url: str, endpoint_url: Optional[str], region: Optional[str]) -> None:
        import boto3

        from quay_bootstrap.stores import split_bucket_url

        self.bucket, self.prefix = split_bucket_url(url)
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url,
                                                     region_name=region)

    def get(self, key):
        import botocore.exceptions

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return got["Body"].read(), got["ETag"]
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def _put(self, key, data, **condition) -> bool:
        import botocore.exceptions

        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                   **condition)
            return True
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                            "ConditionalRequestConflict", "412"):
                return False
            raise

    def create(self, key, data):
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key, data, token):
        return self._put(key, data, IfMatch=token)

    def delete(self, key):
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)


class GCSStore(Store):
    def __init__(self, url: str, endpoint_url: Optional[str]) -> None:
        from google.cloud import storage

        from quay_bootstrap.stores import split_bucket_url

        bucket, self.prefix = split_bucket_url(url)
        options = {"api_endpoint": endpoint_url} if endpoint_url else None
        self.bucket = storage.Client(client_options=options).bucket(bucket)

    def get(self, key):
        from google.api_core.exceptions import NotFound

        blob = self.bucket.blob(self.prefix + key)
        try:
            data = blob.download_as_bytes()
        except NotFound:
            return None
        return data, str(blob.generation)

    def _put(self, key, data, generation) -> bool:
        from google.api_core.exceptions import PreconditionFailed

        try:
            self.bucket.blob(self.prefix + key).upload_from_string(
                data, if_generation_match=generation)
            return True
        except PreconditionFailed:
            return False

    def create(self, key, data):
        return self._put(key, data, 0)

    def replace(self, key, data, token):
        return self._put(key, data, int(token))

    def delete(self, key):
        from google.api_core.exceptions import NotFound

        try:
            self.bucket.blob(self.prefix + key).delete()
        except NotFound:
            pass


class FileStore(Store):
    def __init__(self, url: str) -> None:
        self.root = Path("/" + url.partition("://")[2].lstrip("/"))

    def get(self, key):
        try:
            path = self.root / key
            return path.read_bytes(), str(path.stat().st_mtime_ns)
        except FileNotFoundError:
            return None

    def create(self, key, data):
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.root / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return True

    def replace(self, key, data, token):
        got = self.get(key)
        if got is None or got[1] != token:
            return False
        tmp = self.root / f".{key}.{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, self.root / key)
        return True

    def delete(self, key):
        (self.root / key).unlink(missing_ok=True)


def open_store(stack) -> Store:
    """The lease store beside `stack.source`, with the stack's endpoint and credentials."""
    url = lease_prefix(stack.source)
    if url.startswith("s3://"):
        return S3Store(url, stack.endpoint_url, stack.region)
    if url.startswith("gs://"):
        return GCSStore(url, stack.endpoint_url)
    return FileStore(url)


@dataclass
class Budget:
    """Args: the lease store; this node's name; how many slots; lease lifetime in seconds."""

    store: Store
    me: str
    slots: int
    ttl: float
    clock: Callable[[], float] = time.time

    def try_acquire(self, reason: str = "") -> Optional[int]:
        """Take a free or expired slot; the slot number, or None when all are held."""
        body = LeaseBody(self.me, self.clock() + self.ttl, reason).encode()
        for slot in range(self.slots):
            key = f"lease-{slot}"
            got = self.store.get(key)
            if got is None:
                if self.store.create(key, body):
                    return slot
                continue
            current = LeaseBody.decode(got[0])
            if may_take(current, self.me, self.clock()) and self.store.replace(key, body, got[1]):
                if current and current.holder != self.me:
                    log.warning("rollout.lease_taken_over", slot=slot, from_holder=current.holder,
                                expired_seconds_ago=round(self.clock() - current.expires, 1))
                return slot
        return None

    def acquire(self, reason: str, sleep: Callable[[float], None], poll: float = 2.0) -> int:
        """Wait for a slot (sleep is the daemon's stop-aware sleep, so SIGTERM ends the wait)."""
        waited = False
        while True:
            slot = self.try_acquire(reason)
            if slot is not None:
                log.info("rollout.lease_acquired", slot=slot, holder=self.me, reason=reason)
                return slot
            if not waited:
                log.info("rollout.waiting_for_lease", slots=self.slots, holder=self.me)
                waited = True
            sleep(poll)

    def release(self, slot: int) -> None:
        key = f"lease-{slot}"
        got = self.store.get(key)
        if got is not None:
            current = LeaseBody.decode(got[0])
            if current is None or current.holder == self.me:
                self.store.delete(key)
        log.info("rollout.lease_released", slot=slot, holder=self.me)
