"""The stack folder on disk: immutable versions, an atomic `current` link, a last-known-good link.

Layout under stack.dir:
    versions/<id>/            one folder per version, never changed once written
    manifests/<id>.json       what each file was in the store (size, token, sha256)
    current -> versions/<id>  replaced by rename, so readers see the old or the new, never half
    last-known-good -> versions/<id>
    in-use -> versions/<id>   what the Quay container mounts right now
    .staging-<pid>-<rand>/    a fetch in progress; removed on failure, or on the next run
    .lock                     one fetch at a time
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from quay_bootstrap.errors import QuayBootstrapError
from quay_bootstrap.paths import make_dirs
from quay_bootstrap.stack.plan import ManifestEntry, prune

_LIBC = ctypes.CDLL(None, use_errno=True)
DIR_MODE = 0o750
FILE_MODE = 0o640


# Rejections remembered in rejected.json: the newest few are enough to stop a retry loop.
REJECTIONS_KEPT = 20


class StackStore:
    """Owns stack.dir. Args: root folder; owner (uid, gid) for the files Quay reads."""

    def __init__(self, root: Path, owner: Optional[Tuple[int, int]] = None) -> None:
        self.root = Path(root)
        self.owner = owner
        self.versions = self.root / "versions"
        self.manifests = self.root / "manifests"
        self._lock_fd: Optional[int] = None

    # --- locking and crash recovery -------------------------------------------------------
    def __enter__(self) -> "StackStore":
        for folder in (self.root, self.versions, self.manifests):
            make_dirs(folder, DIR_MODE)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QuayBootstrapError("another quay-bootstrap is fetching into this stack folder",
                                     where=str(self.root),
                                     hint="Wait for it, or stop the other agent") from None
        self._lock_fd = fd
        self.remove_stale_staging()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_stale_staging(self) -> List[str]:
        """Remove staging folders left by a killed or failed fetch (we hold the lock)."""
        removed = []
        for entry in self.root.glob(".staging-*"):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        for entry in self.root.glob(".link-*"):
            entry.unlink(missing_ok=True)
        return removed

    # --- reading --------------------------------------------------------------------------
    def current(self) -> Optional[str]:
        return self._link_target("current")

    def known_good(self) -> Optional[str]:
        return self._link_target("last-known-good")

    def in_use(self) -> Optional[str]:
        return self._link_target("in-use")

    def path(self, version: str) -> Path:
        return self.versions / version

    def manifest(self, version: Optional[str]) -> Dict[str, ManifestEntry]:
        if not version:
            return {}
        try:
            data = json.loads((self.manifests / f"{version}.json").read_text())
            return {k: ManifestEntry(**v) for k, v in data["files"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return {}  # no usable manifest: every object is downloaded again

    def _link_target(self, name: str) -> Optional[str]:
        try:
            target = os.readlink(self.root / name)
        except OSError:
            return None
        version = Path(target).name
        return version if (self.versions / version).is_dir() else None

    # --- writing --------------------------------------------------------------------------
    def new_staging(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=self.root))

    def write_file(self, staging: Path, key: str, data: bytes) -> None:
        """Write one file into staging, folders 0750 and files 0640, owned by the owner."""
        target = staging / key
        make_dirs(target.parent, DIR_MODE, self.owner)
        fd = _create(target, os.O_EXCL)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.owner:
                os.fchown(fd, *self.owner)
        finally:
            os.close(fd)

    def commit(self, staging: Path, version: str, manifest: Dict[str, ManifestEntry],
               source: str) -> None:
        """Make staging the version `version` and point `current` at it, atomically."""
        os.chmod(staging, DIR_MODE)
        if self.owner:
            os.chown(staging, *self.owner)
        final = self.path(version)
        if final.is_dir() and (version == self.in_use() or _matches(final, manifest)):
            shutil.rmtree(staging)  # an older version came back: its folder is still here
            os.utime(final)
        else:
            if final.is_dir():  # damaged since it was written: replace it
                shutil.rmtree(final)
            _fsync_tree(staging)
            os.rename(staging, final)
        self.write_manifest(version, manifest, source)
        self._set_link("current", version)

    def write_manifest(self, version: str, manifest: Dict[str, ManifestEntry], source: str) -> None:
        data = {"version": version, "source": source, "written": time.time(),
                "files": {k: vars(v) for k, v in sorted(manifest.items())}}
        tmp = self.manifests / f".{version}.json.tmp"
        tmp.unlink(missing_ok=True)
        fd = _create(tmp, os.O_EXCL)  # as the stack's files
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(data, indent=1))
        os.replace(tmp, self.manifests / f"{version}.json")

    def reject(self, version: str, image: str, spec: str) -> None:
        """Remember that Quay was not healthy on this stack + image + spec, across restarts,
        with the store's tokens of the stack's objects: while the source still lists exactly
        those, the stack is neither downloaded nor applied again."""
        tokens = {key: entry.token for key, entry in self.manifest(version).items()}
        kept = [r for r in self.rejections()
                if (r["version"], r["image"], r["spec"]) != (version, image, spec)]
        record = {"version": version, "image": image, "spec": spec, "tokens": tokens,
                  "at": time.time()}
        tmp = self.root / f".rejected.json.{os.getpid()}"
        fd = _create(tmp, os.O_TRUNC)
        with os.fdopen(fd, "w") as out:
            json.dump((kept + [record])[-REJECTIONS_KEPT:], out)
        os.replace(tmp, self.root / "rejected.json")

    def rejections(self) -> List[dict]:
        try:
            found = json.loads((self.root / "rejected.json").read_text())
        except (OSError, ValueError):
            return []
        return [r for r in found if isinstance(r, dict) and {"version", "image", "spec",
                                                             "tokens"} <= set(r)]

    def is_rejected(self, version: str, image: str, spec: str) -> bool:
        return any((r["version"], r["image"], r["spec"]) == (version, image, spec)
                   for r in self.rejections())

    def rejected_listing(self, tokens: Dict[str, str]) -> Optional[str]:
        """The rejected version the source lists again unchanged (same objects, same tokens),
        if any, unless it is the live one (only its image or spec was at fault)."""
        current = self.current()
        for record in self.rejections():
            if record["tokens"] == tokens and record["version"] != current:
                return record["version"]
        return None

    def mark_known_good(self, version: str) -> None:
        self._set_link("last-known-good", version)

    def switch_current(self, version: str) -> None:
        """Point `current` back at an older version (a rollback)."""
        self._set_link("current", version)

    def mark_in_use(self, version: str) -> None:
        """The version a Quay container mounts: never pruned while it does."""
        self._set_link("in-use", version)

    def _set_link(self, name: str, version: str) -> None:
        tmp = self.root / f".link-{name}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        os.symlink(Path("versions") / version, tmp)
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def prune(self, keep: int) -> List[str]:
        """Delete versions beyond the `keep` newest; never current, last-known-good or in-use."""
        versions = [(p.name, p.stat().st_mtime) for p in self._version_dirs()]
        protected = [v for v in (self.current(), self.known_good(), self.in_use()) if v]
        doomed = prune(versions, keep, protected)
        for version in doomed:
            shutil.rmtree(self.path(version), ignore_errors=True)
            (self.manifests / f"{version}.json").unlink(missing_ok=True)
        return doomed

    def _version_dirs(self) -> Iterator[Path]:
        return (p for p in self.versions.iterdir() if p.is_dir())


def _matches(folder: Path, manifest: Dict[str, ManifestEntry]) -> bool:
    """True when `folder` holds exactly the manifest's files with their content."""
    import hashlib

    found = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    if set(found) != set(manifest):
        return False
    return all(hashlib.sha256(found[k].read_bytes()).hexdigest() == v.sha256
               for k, v in manifest.items())


def _create(path: Path, flag: int) -> int:
    # The mode given to open is masked by the umask (0077 under the unit): set it outright, so
    # the files are 0640 however the agent was started.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | flag, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def _fsync_tree(root: Path) -> None:
    # The rename must not reach the disk before the files do, or a power cut leaves empty
    # files. One syncfs(2) of the stack's filesystem costs far less than an fsync per file,
    # and unlike sync(2) does not wait for a docker pull writing elsewhere.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
