"""Object stores: the stack source and the rollout leases, one module per URL scheme, one
registry."""
from __future__ import annotations

import importlib
import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol, Tuple

from quay_bootstrap.errors import ConfigError, CorruptDownload
from quay_bootstrap.schemes import SCHEMES as SCHEMES
from quay_bootstrap.schemes import schemes as schemes

if TYPE_CHECKING:
    from quay_bootstrap.config import StackConfig

# SCHEMES, the one place a URL scheme is mapped to its store's module (imported on first use, so
# `quay-bootstrap --help` never loads boto3 or google-cloud-storage), lives in schemes.py: the
# agent config checks URLs against it without importing the stores, which name its types.

# Bytes asked of a body at a time once an object is too big for one read: large enough that
# a stack of small files costs one call each, small enough that a store sending more than it
# listed is stopped within a chunk of the listed size.
CHUNK = 1 << 20
# What an object read by key without a listing (the image lock, a lease record) may hold: they
# are a few lines, and a store answering with more must not be able to fill the agent's memory.
SMALL_OBJECT = 1 << 20


@dataclass(frozen=True)
class ObjectInfo:
    """One object under the source prefix, as the store lists it.

    Attributes:
        key: path relative to the prefix, '/'-separated, exactly as the store spells it.
        size: bytes, as listed.
        token: the store's change marker (S3 ETag, GCS generation, file mtime+inode): equal
            tokens mean the same content, so an unchanged object is never downloaded again.
        checksums: what the store vouches for, by algorithm: md5 and sha256 as hex, crc32c as
            hex of the big-endian value.
    """

    key: str
    size: int
    token: str
    checksums: Dict[str, str] = field(default_factory=dict)
    # The provider's own: what its listing saw that its read must find again (file://: the path
    # below the directory the key resolved to, st_dev, st_ino). Empty for the object stores.
    origin: Tuple[Any, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Download:
    """An object's bytes plus any checksum the store sent with them (e.g. S3 ChecksumSHA256)."""

    data: bytes
    checksums: Dict[str, str] = field(default_factory=dict)


class StackSource(Protocol):
    """A prefix in an object store (or a directory) holding conf/stack."""

    url: str

    def list(self, limit: Optional[int] = None) -> List[ObjectInfo]:
        """Every object under the prefix, or the first `limit` + 1 when there are more (the
        caller refuses such a stack anyway: a prefix naming a bucket of millions of objects
        then costs a page or two, not the agent's memory). Raises SourceError (permanent) or
        TransientError."""

    def read(self, obj: ObjectInfo) -> Download:
        """The object's bytes, exactly the listed version where the store allows it.

        At most `obj.size` + 1 bytes are ever held: a store sending more than it listed is a
        CorruptDownload as soon as the extra byte arrives (plan_fetch keeps the listed sizes
        under stack.max_bytes, so a fetch never holds more than that either)."""

    def get(self, key: str) -> bytes:
        """One object by key (e.g. the cluster image lock), at most SMALL_OBJECT bytes. Raises
        SourceError when missing or larger."""

    def secrets(self) -> List[str]:
        """The credentials this source signs with, as they are now, for the log redactor."""


class LeaseStore(Protocol):
    """Small objects under one prefix, written only conditionally, so that nodes racing for the
    same lease never both win.

    Conditional create: S3 `IfNoneMatch="*"`, GCS `if_generation_match=0`, O_EXCL semantics in a
    directory (a link() that fails when the name exists). Conditional replace: S3
    `IfMatch=<etag>`, GCS `if_generation_match=<generation>`, compare-token under a lock in a
    directory.
    """

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        """(the bytes, their version token), or None when there is no such object; SourceError
        when it holds more than SMALL_OBJECT bytes."""

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it does not exist; False when it does (someone else won)."""

    def replace(self, key: str, data: bytes, token: str) -> bool:
        """Overwrite `key` only if it is still the version `get` returned `token` for; False
        when it changed or was deleted meanwhile."""

    def delete(self, key: str) -> None:
        """Remove `key`; no error when it is already gone."""


class Provider(Protocol):
    """What each module named in SCHEMES provides."""

    Source: Callable[[str, Any], StackSource]  # (url, client)
    Leases: Callable[[str, Any], LeaseStore]  # (url, client)

    def client(self, url: str, stack: Optional["StackConfig"], concurrency: int) -> Any:
        """The store's client from the stack settings (`url` only names the store in errors)."""


@dataclass(frozen=True)
class Store:
    """One store opened with the stack settings: the stack source and the leases beside it,
    sharing one client."""

    source: StackSource
    leases: LeaseStore


def provider(url: str) -> Provider:
    """The module serving `url`'s scheme, imported now.

    Raises:
        ConfigError: no store is known for the scheme; never a silent default, which would
            e.g. put leases where the other nodes do not look.
    """
    scheme = url.partition("://")[0]
    if scheme not in SCHEMES:
        known = ", ".join(f"{name}://" for name in SCHEMES)
        raise ConfigError(f"no object store is known for the URL scheme {scheme!r}", where=url,
                          hint=f"Use one of {known}")
    return importlib.import_module(SCHEMES[scheme])  # type: ignore[return-value]


def lease_prefix(stack_source: str) -> str:
    """Leases live beside the stack, never inside it: s3://b/conf/stack -> s3://b/conf/stack.rollout"""
    return stack_source.rstrip("/") + ".rollout"


def open_store(stack: "StackConfig", *, concurrency: Optional[int] = None) -> Store:
    """The stack source and its leases on one client (concurrency: stack.concurrency unless
    given)."""
    module = provider(stack.source)
    client = module.client(stack.source, stack, concurrency or stack.concurrency)
    return Store(source=module.Source(stack.source, client),
                 leases=module.Leases(lease_prefix(stack.source), client))


def open_source(url: str, stack: Optional["StackConfig"] = None, *,
                concurrency: int = 16) -> StackSource:
    """The source at `url` with the stack's endpoint, region, CA bundle and timeouts."""
    module = provider(url)
    return module.Source(url, module.client(url, stack, concurrency))


def open_leases(stack: "StackConfig") -> LeaseStore:
    """The lease store beside `stack.source`, with the same client settings as the source."""
    url = lease_prefix(stack.source)
    module = provider(url)
    # Lease calls are one at a time: one pooled connection is enough.
    return module.Leases(url, module.client(url, stack, 1))


def open_object(url: str, stack: Optional["StackConfig"] = None) -> Tuple[StackSource, str]:
    """(the source holding one object's folder, the object's key) for a URL such as the lock's."""
    scheme, _, rest = url.partition("://")
    provider(url)  # an unknown scheme is a ConfigError before anything else
    folder, _, key = rest.rstrip("/").rpartition("/")
    if scheme != "file" and "/" not in rest.strip("/"):
        raise ValueError(f"{url!r} names a bucket, not an object")
    return open_source(f"{scheme}://{folder}", stack, concurrency=1), key


def split_bucket_url(url: str) -> tuple:
    """('bucket', 'prefix/') from s3://bucket/prefix or gs://bucket/prefix/ ('' for the whole
    bucket)."""
    rest = url.partition("://")[2]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")


def read_at_most(read: Callable[[int], bytes], limit: int) -> bytes:
    """What `read(n)` (a body's or a file's) gives, stopping once more than `limit` bytes came:
    the result is at most `limit` + 1 bytes, so its length tells a body that was longer. One
    read(limit + 1) for an object under CHUNK, then one more that finds the end."""
    want = limit + 1
    parts: List[bytes] = []
    got = 0
    while got < want:
        part = read(min(want - got, CHUNK))
        if not part:
            break
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def check_not_longer(data: bytes, limit: int, where: str) -> bytes:
    """`data` from read_at_most(limit), refused when the store sent more than `limit`."""
    if len(data) > limit:
        raise CorruptDownload(f"{where}: the store sent more than the {limit} bytes it listed")
    return data


class BoundedBuffer(io.BytesIO):
    """A file to download into that refuses to grow past `limit` bytes: the write that would
    is a CorruptDownload, which stops the download (for SDKs that write a body to a file)."""

    def __init__(self, limit: int, where: str) -> None:
        super().__init__()
        self.limit, self.where = limit, where

    def write(self, data) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.limit:
            raise CorruptDownload(f"{self.where}: the store sent more than the {self.limit} "
                                  "bytes it listed")
        return super().write(data)
