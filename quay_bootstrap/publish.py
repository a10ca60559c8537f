"""The operator's commands on published stacks: `publish`, `history`, `diff`, `rollback`
(the format and the nodes' side are in stack/published.py).

A publication uploads the bundle and the version record first (content-addressed: writing them
again is harmless), then the pointer last with a conditional write (create when there is none,
else replace exactly the pointer read). A publisher that loses the race changes nothing nodes
see; what it uploaded is named by content and is reused by whoever publishes those files.
"""
from __future__ import annotations

import difflib
import getpass
import hashlib
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import structlog

from quay_bootstrap.errors import ConfigError, SourceError
from quay_bootstrap.stack import published as pub
from quay_bootstrap.stack.plan import Limits, stack_version, unsafe_key_reason
from quay_bootstrap.stores.put import uploader as uploader

log = structlog.get_logger(__name__)


def who() -> str:
    """user@host, for the pointer's `published_by`."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def now_text(clock: Callable[[], float] = time.time) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(clock()))


def read_folder(folder: Path, limits: Limits) -> Dict[str, bytes]:
    """Every regular file below FOLDER (symlinks to files read through), within the limits."""
    if not folder.is_dir():
        raise SourceError("not a directory", where=str(folder),
                          hint="Name the conf/stack folder to publish")
    files: Dict[str, bytes] = {}
    total = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = path.relative_to(folder).as_posix()
        problem = unsafe_key_reason(name)
        if problem:
            raise SourceError(f"the file name {name!r} cannot be published ({problem})",
                              where=str(path), hint="Rename it")
        files[name] = path.read_bytes()
        total += len(files[name])
        if len(files) > limits.max_files or total > limits.max_bytes:
            raise SourceError(f"{folder} holds more than stack.max_files ({limits.max_files}) "
                              f"files or stack.max_bytes ({limits.max_bytes}) bytes; nothing was "
                              "uploaded", where=str(folder),
                              hint="The nodes would refuse it: publish less, or raise both "
                                   "limits in the nodes' config and the one given here")
    if not files:
        raise SourceError("the folder holds no files; nothing was uploaded", where=str(folder))
    return files


# The log line names the first few changed files; `history` and `diff` show them all.
LOGGED_CHANGES = 20


@dataclass
class Publisher:
    """Args: the `.published` lease store (stack/published.open_published); the stack limits;
    `upload(key, data)` writing one object under it; a clock; who publishes."""

    leases: object
    limits: Limits
    upload: Callable[[str, bytes], None]
    clock: Callable[[], float] = time.time
    by: str = ""

    @property
    def url(self) -> str:
        return self.leases.url

    def current(self):
        """(the pointer, its token), or (None, None) when nothing is published."""
        got = pub.read_object(self.leases, pub.POINTER)
        if got is None:
            return None, None
        return pub.parse_pointer(got[0], f"{self.url}/{pub.POINTER}"), got[1]

    def _current_or_broken(self):
        """As `current`, but a pointer that does not parse (damaged by hand) reads as nothing
        published with its token, so a new publication replaces it (its history is lost)."""
        try:
            return self.current()
        except SourceError as err:
            got = pub.read_object(self.leases, pub.POINTER)
            if got is None:
                return None, None
            log.warning("publish.replacing_broken_pointer", problem=str(err), url=self.url)
            return None, got[1]

    def publish(self, files: Dict[str, bytes], sign_key: Optional[bytes] = None,
                check: Optional[Callable[[Dict[str, bytes]], None]] = None) -> "Outcome":
        """Make FILES the published version. CHECK (the nodes' validation) raises on a stack
        that must not go out, before anything is uploaded."""
        if check is not None:
            check(files)
        manifest = pub.manifest_of(files)
        bundle = pub.make_bundle(files)
        if len(bundle) > self.limits.max_bytes:
            raise SourceError(f"the bundle is {len(bundle)} bytes, over stack.max_bytes "
                              f"({self.limits.max_bytes}): the nodes would refuse it; nothing "
                              "was uploaded", where=self.url,
                              hint="Publish less, or raise stack.max_bytes on the nodes first")
        previous, token = self._current_or_broken()
        version = stack_version(manifest.items())
        if previous is not None and previous.version == version:
            return Outcome(previous, published=False)
        pointer = pub.next_pointer(previous, manifest, bundle, self.by or who(),
                                   now_text(self.clock))
        record = pub.VersionRecord(version, pointer.bundle_sha256, len(bundle), manifest)
        self.upload(pointer.bundle, bundle)
        self.upload(pub.version_key(version), record.to_json())
        return Outcome(self._point(pointer, previous, token, sign_key), published=True)

    def rollback(self, version: str, sign_key: Optional[bytes] = None,
                 check: Optional[Callable[[Dict[str, bytes]], None]] = None) -> "Outcome":
        """Publish an earlier version again (a new serial, through the budget like any change):
        its bundle is downloaded, checked against its manifest and validated first."""
        previous, token = self.current()
        record = self.version(version)
        if previous is not None and previous.version == record.version:
            return Outcome(previous, published=False)
        files = self.files(record)
        if check is not None:
            check(files)
        pointer = pub.Pointer(
            serial=(previous.serial + 1) if previous else 1, version=record.version,
            bundle_sha256=record.bundle_sha256, bundle_size=record.bundle_size,
            manifest=record.manifest, published_by=self.by or who(),
            published_at=now_text(self.clock),
            history=((previous.summary(),) + previous.history)[:pub.HISTORY] if previous else (),
            changed=tuple(pub.changed_files(previous.manifest if previous else {},
                                            record.manifest)))
        return Outcome(self._point(pointer, previous, token, sign_key), published=True)

    def version(self, prefix: str) -> pub.VersionRecord:
        """The version record whose id starts with PREFIX (at least 6 hex digits), among the
        versions the pointer and its history name."""
        pointer, _ = self.current()
        if pointer is None:
            raise SourceError("nothing is published here", where=self.url,
                              hint="Publish with `quay-bootstrap publish DIR` first")
        known = [pointer.version] + [h.get("version", "") for h in pointer.history]
        found = sorted({v for v in known if isinstance(v, str) and v.startswith(prefix)})
        if len(prefix) < 6 or len(found) != 1:
            raise SourceError(f"no single published version starts with {prefix!r} "
                              f"({len(found)} do)", where=self.url,
                              hint="Use an id `quay-bootstrap history` shows (6+ characters)")
        got = pub.read_object(self.leases, pub.version_key(found[0]))
        if got is None:
            raise SourceError(f"the record of version {found[0][:12]} is missing",
                              where=f"{self.url}/{pub.version_key(found[0])}",
                              hint="Publish that folder again instead")
        return pub.VersionRecord.parse(got[0], f"{self.url}/{pub.version_key(found[0])}")

    def files(self, record: pub.VersionRecord) -> Dict[str, bytes]:
        probe = pub.Pointer(0, record.version, record.bundle_sha256, record.bundle_size,
                            record.manifest, "", "")
        return pub.read_bundle(self.leases, probe, self.limits)

    def _point(self, pointer, previous, token, sign_key) -> pub.Pointer:
        if sign_key is not None:
            pointer = pub.sign(pointer, sign_key, "publish --sign")
        data = pointer.to_json()
        where = f"{self.url}/{pub.POINTER}"
        try:
            won = self.leases.create(pub.POINTER, data) if token is None else \
                self.leases.replace(pub.POINTER, data, token)
        except SourceError as err:
            if "denied" not in str(err):
                raise
            raise SourceError("no permission to write the published pointer; nothing nodes see "
                              "changed", where=where,
                              hint="Grant the publisher write access to it (S3: s3:PutObject; "
                                   "GCS: storage.objects.create and .delete)") from err
        if not won:
            latest, _ = self.current()
            them = (f"serial {latest.serial}, version {latest.version[:12]} by "
                    f"{latest.published_by}") if latest else "it was removed"
            raise SourceError(f"another publisher changed the pointer first ({them}); nothing "
                              "of this publication is visible to the nodes", where=where,
                              hint="Look at `quay-bootstrap history`, then publish again")
        log.info("stack.published", version=pointer.version, serial=pointer.serial,
                 by=pointer.published_by, changed=list(pointer.changed[:LOGGED_CHANGES]),
                 changed_count=len(pointer.changed), url=self.url,
                 signed=pointer.signature is not None)
        return pointer


@dataclass(frozen=True)
class Outcome:
    pointer: pub.Pointer
    published: bool  # False: that version was already the published one


def history_lines(pointer: Optional[pub.Pointer]) -> List[str]:
    """The publications, newest first: serial, version, when, who, files changed."""
    if pointer is None:
        return []
    rows = [pointer.summary()] + list(pointer.history)
    out = []
    for row in rows:
        changed = row.get("changed") or []
        out.append(f"{row.get('serial', '?'):>4}  {str(row.get('version', ''))[:12]}  "
                   f"{row.get('at', '?')}  {row.get('by', '?')}  "
                   f"{len(changed)} file(s) changed: {' '.join(changed[:8])}"
                   f"{' ...' if len(changed) > 8 else ''}")
    return out


MASK = "***"


def diff_lines(a: Dict[str, bytes], b: Dict[str, bytes], secrets: List[str],
               label_a: str, label_b: str) -> List[str]:
    """A unified diff of two stacks' files, every secret value (SECRETS, longest first) masked;
    a file that is not UTF-8 text or holds a private key is named, never shown."""
    ordered = sorted({s for s in secrets if s}, key=len, reverse=True)

    def text(data: bytes) -> Optional[List[str]]:
        if b"PRIVATE KEY" in data:
            return None
        try:
            body = data.decode("utf-8")
        except UnicodeDecodeError:
            return None
        for secret in ordered:
            body = body.replace(secret, MASK)
        return body.splitlines(keepends=True)

    out: List[str] = []
    for name in sorted(set(a) | set(b)):
        old, new = a.get(name), b.get(name)
        if old == new:
            continue
        old_text = text(old) if old is not None else []
        new_text = text(new) if new is not None else []
        if old_text is None or new_text is None:
            digest = lambda d: hashlib.sha256(d).hexdigest()[:12] if d is not None else "absent"  # noqa: E731
            out.append(f"~ {name}: content not shown (binary or a private key): "
                       f"{digest(old)} -> {digest(new)}\n")
            continue
        if old_text == new_text:
            out.append(f"~ {name}: only secret values changed (masked)\n")
            continue
        out.extend(difflib.unified_diff(old_text, new_text, f"{label_a}/{name}",
                                        f"{label_b}/{name}"))
    return out


def stack_secrets(files: Dict[str, bytes], environ) -> List[str]:
    """The secret values the nodes' validation finds in a stack (what the log redactor masks)."""
    from quay_bootstrap.stack.validate import check_stack

    checked = check_stack(list(files), files.get("config.yaml"), files.__getitem__, environ)
    return sorted(checked.secrets)


def validator(environ) -> Callable[[Dict[str, bytes]], None]:
    """The nodes' own checks (validate --stack, Quay's rules): a ConfigError naming every
    problem, before anything is uploaded."""
    from quay_bootstrap.stack.validate import check_stack

    def check(files: Dict[str, bytes]) -> None:
        checked = check_stack(list(files), files.get("config.yaml"), files.__getitem__, environ)
        for where, what in checked.warnings:
            log.warning("stack.warning", where=where, problem=what)
        if not checked.ok:
            raise ConfigError(f"the stack is not valid ({len(checked.errors)} problem(s)); "
                              "nothing was uploaded", where="publish",
                              hint="Fix it (`quay-bootstrap validate --stack DIR` shows the same "
                                   "checks), then publish again", problems=checked.errors)
    return check
