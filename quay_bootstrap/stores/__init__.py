"""Where conf/stack comes from: one small interface, one module per object store, chosen by URL scheme."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Protocol, Tuple

if TYPE_CHECKING:
    from quay_bootstrap.config import StackConfig


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


@dataclass(frozen=True)
class Download:
    """An object's bytes plus any checksum the store sent with them (e.g. S3 ChecksumSHA256)."""

    data: bytes
    checksums: Dict[str, str] = field(default_factory=dict)


class StackSource(Protocol):
    """A prefix in an object store (or a directory) holding conf/stack."""

    url: str

    def list(self) -> List[ObjectInfo]:
        """Every object under the prefix. Raises SourceError (permanent) or TransientError."""

    def read(self, obj: ObjectInfo) -> Download:
        """The object's bytes, exactly the listed version where the store allows it."""

    def get(self, key: str) -> bytes:
        """One object by key (e.g. the cluster image lock). Raises SourceError when missing."""


def open_source(url: str, stack: Optional["StackConfig"] = None, *,
                concurrency: int = 16) -> StackSource:
    """The provider for `url`'s scheme; cloud SDKs are imported only here, on first use."""
    scheme = url.partition("://")[0]
    endpoint = stack.endpoint_url if stack else None
    region = stack.region if stack else None
    ca_bundle = str(stack.ca_bundle) if stack and stack.ca_bundle else None
    if scheme == "s3":
        from quay_bootstrap.stores.s3 import S3Source

        return S3Source(url, endpoint_url=endpoint, region=region, ca_bundle=ca_bundle,
                        concurrency=concurrency)
    if scheme == "gs":
        from quay_bootstrap.stores.gcs import GCSSource

        return GCSSource(url, endpoint_url=endpoint, concurrency=concurrency)
    if scheme == "file":
        from quay_bootstrap.stores.file import FileSource

        return FileSource(url)
    raise ValueError(f"unsupported source scheme in {url!r}")


def open_object(url: str, stack: Optional["StackConfig"] = None) -> Tuple[StackSource, str]:
    """(the source holding one object's folder, the object's key) for a URL such as the lock's."""
    scheme, _, rest = url.partition("://")
    folder, _, key = rest.rstrip("/").rpartition("/")
    if scheme != "file" and "/" not in rest.strip("/"):
        raise ValueError(f"{url!r} names a bucket, not an object")
    return open_source(f"{scheme}://{folder}", stack, concurrency=1), key


def split_bucket_url(url: str) -> tuple:
    """('bucket', 'prefix/') from s3://bucket/prefix or gs://bucket/prefix/ ('' for the whole bucket)."""
    rest = url.partition("://")[2]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    return bucket, (prefix + "/" if prefix else "")
