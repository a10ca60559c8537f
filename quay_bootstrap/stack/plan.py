"""Pure decisions about a listed stack: safe keys, limits, what to download, checksums, version id."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple

from quay_bootstrap.errors import SourceError
from quay_bootstrap.stores import ObjectInfo


def unsafe_key_reason(key: str) -> Optional[str]:
    """Why `key` may not become a path under the stack folder, or None when it is safe."""
    if not key:
        return "it is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "it contains a NUL or control character"
    if "\\" in key:
        return "it contains a backslash"
    if key.startswith("/"):
        return "it is absolute"
    parts = key.split("/")
    if any(p in (".", "..") for p in parts):
        return "it contains a '.' or '..' component that would escape the stack folder"
    if any(p == "" for p in parts):
        return "it contains an empty path component ('//')"
    if any(len(p.encode()) > 255 for p in parts):
        return "a path component is longer than 255 bytes"
    return None


class Limits(NamedTuple):
    """What one stack may hold (stack.max_files, stack.max_bytes)."""

    max_files: int
    max_bytes: int


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a stored stack version, as its manifest records it."""

    size: int
    token: str
    sha256: str


@dataclass(frozen=True)
class Plan:
    """What a fetch must do: download some objects, reuse others from the current version."""

    objects: Tuple[ObjectInfo, ...]
    download: Tuple[ObjectInfo, ...]
    reuse: Tuple[ObjectInfo, ...]
    unchanged: bool

    @property
    def total_bytes(self) -> int:
        return sum(o.size for o in self.objects)


def plan_fetch(url: str, objects: Sequence[ObjectInfo], limits: Limits,
               current: Optional[Mapping[str, ManifestEntry]] = None) -> Plan:
    """Check a listing and decide what to download.

    Raises:
        SourceError: the prefix is empty, a key is unsafe, a path is both a file and a folder,
            or the stack is over its limits. Nothing has been written at that point.
    """
    if not objects:
        raise SourceError("no objects found under the stack prefix", where=url,
                          hint="Check the bucket and prefix in stack.source; the prefix must "
                               "hold config.yaml and the other conf/stack files")
    for obj in objects:
        reason = unsafe_key_reason(obj.key)
        if reason:
            raise SourceError(f"refusing the whole stack: the object key {obj.key!r} is unsafe "
                              f"because {reason}", where=url,
                              hint="Rename or delete that object in the store")
    keys = {o.key for o in objects}
    for key in keys:
        head = key
        while "/" in head:
            head = head.rsplit("/", 1)[0]
            if head in keys:
                raise SourceError(f"refusing the whole stack: {head!r} is both a file and a "
                                  f"folder (because of {key!r})", where=url,
                                  hint="Delete one of the two objects in the store")
    if len(objects) > limits.max_files:
        raise SourceError(f"the stack has {len(objects)} files, more than stack.max_files "
                          f"({limits.max_files})", where=url,
                          hint="Check that stack.source names the conf/stack prefix, not a "
                               "larger one, or raise stack.max_files")
    total = sum(o.size for o in objects)
    if total > limits.max_bytes:
        raise SourceError(f"the stack holds {total} bytes, more than stack.max_bytes "
                          f"({limits.max_bytes})", where=url,
                          hint="Check that stack.source names the conf/stack prefix, or "
                               "raise stack.max_bytes")
    current = current or {}
    download, reuse = [], []
    for obj in sorted(objects, key=lambda o: o.key):
        known = current.get(obj.key)
        same = known is not None and known.size == obj.size and known.token == obj.token
        (reuse if same else download).append(obj)
    unchanged = not download and keys == set(current)
    return Plan(tuple(sorted(objects, key=lambda o: o.key)), tuple(download), tuple(reuse),
                unchanged)


def checksum_mismatch(data: bytes, listed: ObjectInfo,
                      sent: Mapping[str, str]) -> Tuple[Optional[str], str]:
    """Compare downloaded bytes with what the store vouches for.

    Returns:
        (problem or None, name of the check that passed or "size only").
    """
    if len(data) != listed.size:
        return f"got {len(data)} bytes, the store listed {listed.size} (truncated?)", ""
    expected: Dict[str, str] = {**listed.checksums, **sent}
    for algorithm in ("sha256", "md5", "crc32c"):
        want = expected.get(algorithm)
        if not want:
            continue
        got = _digest(algorithm, data)
        if got != want:
            return f"{algorithm} is {got}, the store says {want}", ""
        return None, algorithm
    return None, "size only"


def _digest(algorithm: str, data: bytes) -> str:
    if algorithm == "crc32c":
        import google_crc32c  # ships with google-cloud-storage; only GCS composites need it

        return google_crc32c.value(data).to_bytes(4, "big").hex()
    return hashlib.new(algorithm, data).hexdigest()


def stack_version(files: Iterable[Tuple[str, str]]) -> str:
    """The stack's version id: SHA-256 over its sorted (path, content SHA-256) pairs."""
    digest = hashlib.sha256()
    for path, sha in sorted(files):
        digest.update(path.encode("utf-8") + b"\0" + sha.encode("ascii") + b"\n")
    return digest.hexdigest()


def prune(versions: Sequence[Tuple[str, float]], keep: int, protected: Iterable[str]) -> List[str]:
    """Versions to delete: all but the `keep` newest, never a protected one (current, known-good).

    Args:
        versions: (version id, creation time) pairs.
    """
    keep_ids = {v for v, _ in sorted(versions, key=lambda p: p[1], reverse=True)[:keep]}
    keep_ids.update(protected)
    return sorted(v for v, _ in versions if v not in keep_ids)
