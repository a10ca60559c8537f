"""Published stacks (`quay-bootstrap publish`): one version is one bundle, made visible by a
pointer written last with a conditional write, so no node ever sees half of it.

Beside the stack source (`<source>.published/`, never inside it, as the leases are):

    bundles/<sha256>/stack.tar.gz   the files: one deterministic gzip'd tar, named by its hash
    versions/<version>.json         a version's manifest and bundle (for diff and rollback)
    pointer                         what nodes run: the version, its manifest, who and when,
                                    the publications before it, an optional ed25519 signature

The version id is the one a node computes for any stack (`plan.stack_version`): the same files
published or uploaded by hand are the same version. Everything here but `Published` and
`Publisher` is pure.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Tuple

from quay_bootstrap.errors import ConfigError, SourceError, TransientError
from quay_bootstrap.stack.plan import Limits, stack_version, unsafe_key_reason

SUFFIX = ".published"
POINTER = "pointer"
FORMAT = 1
HISTORY = 50  # publications kept in the pointer, newest first
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def published_url(source: str) -> str:
    """s3://b/conf/stack -> s3://b/conf/stack.published"""
    return source.rstrip("/") + SUFFIX


def bundle_key(sha: str) -> str:
    return f"bundles/{sha}/stack.tar.gz"


def version_key(version: str) -> str:
    return f"versions/{version}.json"


@dataclass(frozen=True)
class Pointer:
    """The published version. `history`: the publications before this one, newest first, each
    {serial, version, by, at, changed}."""

    serial: int
    version: str
    bundle_sha256: str
    bundle_size: int
    manifest: Dict[str, str]
    published_by: str
    published_at: str
    history: Tuple[dict, ...] = ()
    signature: Optional[str] = None
    changed: Tuple[str, ...] = ()

    @property
    def bundle(self) -> str:
        return bundle_key(self.bundle_sha256)

    def summary(self) -> dict:
        return {"serial": self.serial, "version": self.version, "by": self.published_by,
                "at": self.published_at, "changed": list(self.changed)}

    def to_json(self) -> bytes:
        data = {"format": FORMAT, **asdict(self)}
        data["history"], data["changed"] = list(self.history), list(self.changed)
        return json.dumps(data, sort_keys=True, indent=1).encode()


def manifest_of(files: Mapping[str, bytes]) -> Dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}


def changed_files(old: Mapping[str, str], new: Mapping[str, str]) -> List[str]:
    """'+name', '-name', '~name' for each file added, removed or changed, sorted by name."""
    marks = [f"+{n}" for n in new if n not in old] + [f"-{n}" for n in old if n not in new]
    marks += [f"~{n}" for n in new if n in old and old[n] != new[n]]
    return sorted(marks, key=lambda mark: mark[1:])


def make_bundle(files: Mapping[str, bytes]) -> bytes:
    """The files as a gzip'd tar with nothing but names and contents in it (sorted, mode 0644,
    owner 0, time 0): the same files make the same bytes, so the same bundle key."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(files[name]), 0o644, 0
            tar.addfile(info, io.BytesIO(files[name]))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0, compresslevel=6) as zipped:
        zipped.write(raw.getvalue())
    return out.getvalue()


def open_bundle(data: bytes, pointer: Pointer, limits: Limits, where: str) -> Dict[str, bytes]:
    """The bundle's files, each checked against the pointer's manifest.

    Raises:
        SourceError: the bundle is not what the pointer names (hash, size), holds anything but
            regular files at safe paths, more than the limits (counted while reading, so a
            decompression bomb stops at stack.max_bytes), or files the manifest does not list
            with those contents.
    """
    if len(data) != pointer.bundle_size or hashlib.sha256(data).hexdigest() != pointer.bundle_sha256:
        raise SourceError(f"refusing version {pointer.version[:12]}: its bundle is not the one "
                          f"the pointer names (sha256 and size differ)", where=where,
                          hint="Publish the version again; a store or proxy may be altering "
                               "objects")
    files: Dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for member in tar:
                problem = None if member.isreg() else "it is not a regular file"
                problem = problem or unsafe_key_reason(member.name)
                if problem is None and member.name in files:
                    problem = "it appears twice"
                if problem:
                    raise SourceError(f"refusing version {pointer.version[:12]}: the bundle's "
                                      f"entry {member.name!r} is unsafe ({problem})", where=where,
                                      hint="Publish with `quay-bootstrap publish`")
                total += member.size
                if len(files) >= limits.max_files or total > limits.max_bytes:
                    raise SourceError(f"refusing version {pointer.version[:12]}: its bundle holds "
                                      f"more than stack.max_files ({limits.max_files}) files or "
                                      f"stack.max_bytes ({limits.max_bytes}) bytes", where=where,
                                      hint="Raise the limits on the nodes, or publish less")
                body = tar.extractfile(member)
                files[member.name] = body.read(member.size + 1) if body else b""
    except (tarfile.TarError, OSError, EOFError) as err:
        raise SourceError(f"refusing version {pointer.version[:12]}: its bundle does not open "
                          f"({err})", where=where, hint="Publish the version again") from err
    if manifest_of(files) != pointer.manifest:
        raise SourceError(f"refusing version {pointer.version[:12]}: its files do not match its "
                          "manifest", where=where, hint="Publish the version again")
    return files


def parse_pointer(data: bytes, where: str) -> Pointer:
    """A pointer object, checked strictly: its version must be its manifest's."""
    def bad(what: str) -> SourceError:
        return SourceError(f"the published pointer is not valid: {what}", where=where,
                           hint="Publish again with `quay-bootstrap publish`, or `rollback` to a "
                                "version `history` lists")
    try:
        doc = json.loads(data)
    except ValueError as err:
        raise bad(f"not JSON ({err})") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad(f"format must be {FORMAT}")
    manifest = doc.get("manifest")
    if not isinstance(manifest, dict) or not manifest or not all(
            isinstance(k, str) and not unsafe_key_reason(k) and isinstance(v, str) and
            _HEX64.match(v) for k, v in manifest.items()):
        raise bad("its manifest must map safe file paths to SHA-256 hashes")
    try:
        pointer = Pointer(
            serial=_int(doc["serial"]), version=_hex(doc["version"]),
            bundle_sha256=_hex(doc["bundle_sha256"]), bundle_size=_int(doc["bundle_size"]),
            manifest=dict(manifest), published_by=str(doc["published_by"]),
            published_at=str(doc["published_at"]),
            history=tuple(h for h in doc.get("history", []) if isinstance(h, dict)),
            signature=doc.get("signature") if isinstance(doc.get("signature"), str) else None,
            changed=tuple(str(c) for c in doc.get("changed", [])))
    except (KeyError, TypeError, ValueError) as err:
        raise bad(f"missing or wrong field ({err})") from err
    if stack_version(manifest.items()) != pointer.version:
        raise bad("its version is not its manifest's")
    return pointer


def _int(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a count")
    return value


def _hex(value) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ValueError(f"{value!r} is not a SHA-256")
    return value


def signed_payload(pointer: Pointer) -> bytes:
    """What a signature covers: the version (its manifest's hash), the bundle, who, when and
    the serial; the files are checked against the manifest, the bundle against its hash."""
    fields = {"format": FORMAT, "serial": pointer.serial, "version": pointer.version,
              "bundle_sha256": pointer.bundle_sha256, "bundle_size": pointer.bundle_size,
              "published_by": pointer.published_by, "published_at": pointer.published_at}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def sign(pointer: Pointer, private_pem: bytes, where: str) -> Pointer:
    key = _load_key(private_pem, where, private=True)
    return replace(pointer, signature=base64.b64encode(key.sign(signed_payload(pointer))).decode())


def verify(pointer: Pointer, public_pem: bytes, where: str) -> None:
    """Raises SourceError unless the pointer carries a valid signature by the key."""
    from cryptography.exceptions import InvalidSignature

    key = _load_key(public_pem, where, private=False)
    if not pointer.signature:
        raise SourceError(f"refusing version {pointer.version[:12]}: it is not signed and "
                          "stack.verify_key requires a signature", where=where,
                          hint="Publish it with `quay-bootstrap publish --sign KEY`; the live "
                               "stack was left in place")
    try:
        key.verify(base64.b64decode(pointer.signature, validate=True), signed_payload(pointer))
    except (InvalidSignature, ValueError) as err:
        raise SourceError(f"refusing version {pointer.version[:12]}: its signature is not valid "
                          "for stack.verify_key", where=where,
                          hint="Publish it again with the key whose public half the nodes "
                               "have; the live stack was left in place") from err


def _load_key(pem: bytes, where: str, private: bool):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    kind = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    try:
        key = (serialization.load_pem_private_key(pem, password=None) if private
               else serialization.load_pem_public_key(pem))
    except (ValueError, TypeError) as err:
        key = err
    if not isinstance(key, kind):
        half = "private" if private else "public"
        raise ConfigError(f"not an ed25519 {half} key in PEM", where=where,
                          hint="Make one with `openssl genpkey -algorithm ed25519 -out stack.key` "
                               "(the nodes get `openssl pkey -in stack.key -pubout`)")
    return key


def next_pointer(previous: Optional[Pointer], manifest: Dict[str, str], bundle: bytes,
                 who: str, when: str) -> Pointer:
    """The pointer publishing `manifest` after `previous` (None: the first publication)."""
    history: Tuple[dict, ...] = ()
    if previous is not None:
        history = ((previous.summary(),) + previous.history)[:HISTORY]
    return Pointer(serial=(previous.serial + 1) if previous else 1,
                   version=stack_version(manifest.items()),
                   bundle_sha256=hashlib.sha256(bundle).hexdigest(), bundle_size=len(bundle),
                   manifest=dict(manifest), published_by=who, published_at=when,
                   history=history,
                   changed=tuple(changed_files(previous.manifest if previous else {}, manifest)))


@dataclass
class VersionRecord:
    version: str
    bundle_sha256: str
    bundle_size: int
    manifest: Dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, data: bytes, where: str) -> "VersionRecord":
        try:
            doc = json.loads(data)
            record = cls(_hex(doc["version"]), _hex(doc["bundle_sha256"]),
                         _int(doc["bundle_size"]), dict(doc["manifest"]))
        except (ValueError, KeyError, TypeError) as err:
            raise SourceError(f"the version record is not valid ({err})", where=where) from err
        if stack_version(record.manifest.items()) != record.version:
            raise SourceError("the version record's manifest is not its version's", where=where)
        return record

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode()


# The shell: the `.published` prefix on a store, read by nodes and written by `publish`.

def open_published(stack, url: Optional[str] = None, concurrency: int = 1, client=None):
    """The lease store (conditional writes, small reads) at `<url or stack.source>.published`,
    on CLIENT when given (the stack source's: a client costs a node 65 ms to make)."""
    from quay_bootstrap.stores import provider

    where = published_url(url or stack.source)
    module = provider(where)
    return module.Leases(where, client if client is not None else
                         module.client(where, stack, concurrency))


def read_pointer(leases) -> Optional[Pointer]:
    """The published pointer, or None when nothing was ever published there.

    Raises:
        SourceError: denied, or anything else permanent (the live stack stays).
        TransientError: the store did not answer (the fetch retries until its deadline).
    """
    got = read_object(leases, POINTER)
    return None if got is None else parse_pointer(got[0], f"{leases.url}/{POINTER}")


def read_object(leases, key: str) -> Optional[Tuple[bytes, str]]:
    """(the bytes, the token for a conditional write) of one object under `.published/`, or
    None when it does not exist; a store's error as the stack source reports it (read_pointer)."""
    try:
        return leases.get(key)
    except (SourceError, TransientError):
        raise
    except Exception as err:  # noqa: BLE001 - each SDK's own errors, sorted by what they say
        raise _as_the_source_says(leases, key, err) from err


def _as_the_source_says(leases, key: str, err: Exception) -> Exception:
    """The error a stack source reading KEY gives (its provider's own messages: denied
    with the permissions to check, an unknown bucket, a TLS certificate not accepted), by
    asking once more the way a source asks; else `store_error`'s reading of ERR."""
    from quay_bootstrap.stores import provider

    where = f"{leases.url}/{key}"
    try:
        provider(leases.url).Source(leases.url, client_of(leases)).get(key)
    except (SourceError, TransientError) as mapped:
        return mapped
    except Exception:  # noqa: BLE001 - not one the provider knows: read ERR itself
        return store_error(err, where, "read")
    return TransientError(f"{where}: {err}")  # it answered this time: ask again


def store_error(err: Exception, where: str, action: str) -> Exception:
    """An SDK's error on the `.published` prefix as ours: denied and other refusals are
    permanent (SourceError), timeouts, refused connections and 5xx transient."""
    text = f"{type(err).__name__}: {err}"
    if any(word in text for word in ("AccessDenied", "403", "Forbidden", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch", "PermissionError")):
        return SourceError(f"access denied to the published stack ({type(err).__name__})",
                           where=where,
                           hint=f"Let this machine {action} objects under the stack source's "
                                "sibling prefix `.published/` (S3: s3:GetObject on "
                                "conf/stack.published/*; GCS: storage.objects.get), as for "
                                "`.rollout/`")
    if isinstance(err, (OSError, TimeoutError)) or any(
            word in text for word in ("Timeout", "timed out", "Connection", "500", "502", "503",
                                      "504", "SlowDown", "ServiceUnavailable", "InternalError")):
        return TransientError(f"{where}: {text}")
    return SourceError(f"the store refused to {action} the published stack: {text}", where=where,
                       hint="Check stack.source and the store's answer above")


def read_bundle(leases, pointer: Pointer, limits: Limits) -> Dict[str, bytes]:
    """The pointer's files, downloaded in one read of its bundle and checked (open_bundle)."""
    from quay_bootstrap.stores import provider

    where = f"{leases.url}/{pointer.bundle}"
    if pointer.bundle_size > limits.max_bytes:
        raise SourceError(f"refusing version {pointer.version[:12]}: its bundle is "
                          f"{pointer.bundle_size} bytes, over stack.max_bytes ({limits.max_bytes})",
                          where=where, hint="Raise stack.max_bytes on the nodes, or publish less")
    folder = f"{leases.url}/{pointer.bundle.rpartition('/')[0]}"
    source = provider(folder).Source(folder, client_of(leases))
    listed = [o for o in source.list(1) if o.key == "stack.tar.gz"]
    if not listed:
        raise SourceError(f"the bundle of published version {pointer.version[:12]} is missing",
                          where=where, hint="Publish the version again (`quay-bootstrap "
                                            "rollback` re-publishes a version `history` lists)")
    if listed[0].size != pointer.bundle_size:
        raise SourceError(f"refusing version {pointer.version[:12]}: its bundle is "
                          f"{listed[0].size} bytes, the pointer says {pointer.bundle_size}",
                          where=where, hint="Publish the version again")
    return open_bundle(source.read(listed[0]).data, pointer, limits, where)


def client_of(leases):
    """The store client a lease store was opened with (GCS keeps its bucket's)."""
    client = getattr(leases, "client", None)
    bucket = getattr(leases, "bucket", None)
    return client if client is not None or bucket is None else bucket.client
