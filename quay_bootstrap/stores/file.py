"""A local or NFS-mounted directory (file:///DIR), for debugging and on-premises use: source and leases."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from quay_bootstrap.errors import SourceError, TransientError
from quay_bootstrap.paths import make_dirs
from quay_bootstrap.stores import SMALL_OBJECT, Download, ObjectInfo, read_at_most

if TYPE_CHECKING:
    from quay_bootstrap.config import StackConfig

# An NFS server that is away shows up as these; worth retrying, unlike a missing directory.
_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EHOSTDOWN,
                     errno.EHOSTUNREACH}


def client(url: str, stack: Optional["StackConfig"], concurrency: int = 16) -> None:
    """A directory needs no client: each URL is its own root."""
    return None


def directory(url: str) -> Path:
    """file:///srv/stack and file://srv/stack are both /srv/stack."""
    return Path("/" + url.partition("://")[2].lstrip("/"))


class FileSource:
    """Every regular file below a directory; a symlink to a file inside it is read through.

    Reads never follow a link: every folder below the directory is opened with O_NOFOLLOW, and
    so is the file (for a listed symlink, the file it resolved to when listed). The file opened
    must be the one the listing saw (a regular file, same device, inode and size), else the
    whole stack is refused: a file swapped for a link to a root-only file between the listing
    and the copy must never reach Quay's conf/stack.
    """

    def __init__(self, url: str, client: Any = None) -> None:
        self.url = url
        self.root = directory(url)

    def list(self, limit: Optional[int] = None) -> List[ObjectInfo]:
        if not self.root.is_dir():
            raise SourceError("the stack directory does not exist or is not a directory",
                              where=self.url, hint="Check stack.source (file:///DIR)")
        objects: List[ObjectInfo] = []
        try:
            for folder, dirs, files in os.walk(self.root, onerror=_raise):
                if limit is not None and len(objects) > limit:
                    break
                dirs.sort()
                for name in sorted(files):
                    found = self._listed(Path(folder, name))
                    if found is not None:
                        objects.append(found)
                    if limit is not None and len(objects) > limit:
                        break  # one folder of a million files costs no more than max_files
        except OSError as err:
            raise _classify(err, self.url) from err
        return objects

    def _listed(self, path: Path) -> Optional[ObjectInfo]:
        """The listing's entry for one name os.walk found, or None for what is not a file."""
        key = path.relative_to(self.root).as_posix()
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None  # gone since os.walk saw it
        if stat.S_ISLNK(mode):
            if not path.is_file():
                return None  # dangling, or a link to a folder: not part of a stack
            try:
                target = path.resolve().relative_to(self.root.resolve()).as_posix()
            except ValueError:
                raise SourceError(f"refusing the whole stack: {path} links outside the "
                                  "stack directory", where=self.url,
                                  hint="Copy the file into the directory instead") from None
        elif stat.S_ISREG(mode):
            target = key
        else:
            return None  # sockets, FIFOs, devices: not part of a stack
        # Stat what a read will open, through the same no-follow walk, so the listing and the
        # read agree on the file even when the link or a folder changes in between.
        try:
            fd = _open_below(self.root, target)
        except _Planted as err:
            raise _changed(self.url, key, str(err)) from err
        except FileNotFoundError:
            return None  # gone since os.walk saw it
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key=key, size=st.st_size,
                          token=f"{st.st_mtime_ns}:{st.st_ino}:{st.st_size}",
                          origin=(target, st.st_dev, st.st_ino))

    def read(self, obj: ObjectInfo) -> Download:
        target, dev, ino = obj.origin or (obj.key, None, _token_inode(obj.token))
        where = f"{self.url}/{obj.key}"
        try:
            fd = _open_below(self.root, target)
        except _Planted as err:
            raise _changed(self.url, obj.key, str(err)) from err
        except FileNotFoundError as err:
            raise TransientError(f"{where} changed while it was being fetched") from err
        except OSError as err:
            raise _classify(err, where) from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise _changed(self.url, obj.key, "it is no longer a regular file")
            if (dev is not None and st.st_dev != dev) or (ino is not None and st.st_ino != ino):
                raise _changed(self.url, obj.key, "it is another file than the one listed "
                                                  "(replaced, or a link to it re-pointed)")
            if st.st_size != obj.size:
                raise _changed(self.url, obj.key, f"it now holds {st.st_size} bytes, the "
                                                  f"listing saw {obj.size}")
            data = read_at_most(lambda n: os.read(fd, n), obj.size)
        except OSError as err:
            raise _classify(err, where) from err
        finally:
            os.close(fd)
        if len(data) != obj.size:
            raise _changed(self.url, obj.key, f"it changed size while being read (listed with "
                                              f"{obj.size} bytes)")
        return Download(data=data)

    def secrets(self) -> List[str]:
        return []

    def get(self, key: str) -> bytes:
        where = f"{self.url}/{key}"
        try:
            return _read_small(self.root, key, where)
        except FileNotFoundError as err:
            raise SourceError("the file does not exist", where=where,
                              hint="Check the URL") from err
        except OSError as err:
            raise _classify(err, where) from err


class FileLeases:
    """Lease files in a directory: created exclusively, replaced by compare-token under a lock."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.url = url
        self.root = directory(url)

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        where = f"{self.url}/{key}"
        try:
            fd = _open_below(self.root, key)
        except FileNotFoundError:
            return None
        except _Planted as err:
            raise SourceError(f"refusing the lease {key!r}: {err}", where=where,
                              hint="Only quay-bootstrap writes this directory: remove the "
                                   "link and check who else can write it") from err
        try:
            # Inode and mtime from the file just read, plus its content: a replace renames a
            # new inode in, and coarse mtimes alone can repeat within one clock tick.
            st = os.fstat(fd)
            data = _read_fd_small(fd, st, where)
        finally:
            os.close(fd)
        digest = hashlib.sha256(data).hexdigest()[:16]
        return data, f"{st.st_ino}:{st.st_mtime_ns}:{digest}"

    def create(self, key: str, data: bytes) -> bool:
        self._make_root()
        tmp = self._write_aside(key, data)
        try:
            # link() fails when the name exists, like O_EXCL, but publishes the file whole:
            # an O_EXCL file is briefly empty, which a reader would take for an expired lease.
            os.link(tmp, self.root / key)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def replace(self, key: str, data: bytes, token: str) -> bool:
        self._make_root()
        # Compare and rename under one lock, so two nodes taking over the same expired lease
        # cannot both see the old token and both win.
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "r+b") as lock:
            os.fchmod(fd, 0o600)
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            got = self.get(key)
            if got is None or got[1] != token:
                return False
            os.replace(self._write_aside(key, data), self.root / key)
        return True

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def _make_root(self) -> None:
        # A folder others could write would let any local user take or block the rollout slots.
        try:
            make_dirs(self.root)
            writable = os.access(self.root, os.W_OK)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            writable = False
        if not writable:
            # Beside a file:// stack is outside what the unit may write (ProtectSystem=strict).
            raise SourceError("cannot write the rollout leases: the folder is read-only to the "
                              "agent", where=str(self.root),
                              hint=f"Add a drop-in to quay-bootstrap.service with "
                                   f"ReadWritePaths={self.root} (see the README)")

    def _write_aside(self, key: str, data: bytes) -> Path:
        # A random name: nodes sharing the directory over NFS may well share a PID.
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.root)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return Path(tmp)


# What the registry in stores/__init__.py looks up.
Source, Leases = FileSource, FileLeases


class _Planted(OSError):
    """A link (or something other than a folder) where a folder or the file itself was."""


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under a listed name must not hang the read (no effect on files).
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK


def _open_below(root: Path, relative: str) -> int:
    """A read-only descriptor of ROOT/RELATIVE opened without following any link below ROOT
    (ROOT itself, the operator's stack.source, may be one): each folder is opened relative to
    the one before with O_NOFOLLOW|O_DIRECTORY, then the file with O_NOFOLLOW.

    Raises:
        _Planted: a link, or a non-folder, stands where a folder or the file was.
        OSError: anything else (FileNotFoundError when a name is gone).
    """
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _Planted(errno.EINVAL, f"{relative!r} is not a plain path below the directory")
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, part in enumerate(parts[:-1]):
            try:
                inner = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    folder = "/".join(parts[:depth + 1])
                    raise _Planted(err.errno, f"the folder {folder!r} on its path is a "
                                              "symbolic link or not a folder") from err
                raise
            os.close(fd)
            fd = inner
        try:
            return os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _Planted(err.errno, "it is a symbolic link") from err
            raise
    finally:
        os.close(fd)


def _changed(url: str, key: str, what: str) -> SourceError:
    return SourceError(f"refusing the whole stack: {key!r} is not the file listed moments "
                       f"before: {what}; nothing was copied", where=f"{url}/{key}",
                       hint="If the stack directory was being updated, run again once it is "
                            "done; if not, a link may have been planted: check who can write "
                            "the directory")


def _token_inode(token: str) -> Optional[int]:
    """The inode in a listing's token ("mtime_ns:inode:size"), for an ObjectInfo made without
    this module's listing."""
    parts = token.split(":")
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _read_fd_small(fd: int, st: os.stat_result, where: str) -> bytes:
    if not stat.S_ISREG(st.st_mode):
        raise SourceError("not a regular file", where=where, hint="Check the URL")
    data = read_at_most(lambda n: os.read(fd, n), SMALL_OBJECT)
    if len(data) > SMALL_OBJECT:
        raise SourceError(f"the file is larger than {SMALL_OBJECT} bytes, far more than an "
                          "image lock or a lease record holds", where=where,
                          hint="Check the URL names the right file")
    return data


def _read_small(root: Path, key: str, where: str) -> bytes:
    try:
        fd = _open_below(root, key)
    except _Planted as err:
        raise SourceError(f"refusing to read it: {err}", where=where,
                          hint="Point the URL at the file itself, not at a link") from err
    try:
        return _read_fd_small(fd, os.fstat(fd), where)
    finally:
        os.close(fd)


def _raise(err: OSError) -> None:
    raise err


def _classify(err: OSError, where: str) -> Exception:
    if err.errno in _TRANSIENT_ERRNOS:
        return TransientError(f"{where}: {err.strerror}")
    if isinstance(err, PermissionError):
        return SourceError("permission denied reading the stack", where=where,
                           hint="Make the directory readable by the agent (it runs as root)")
    return SourceError(f"cannot read the stack: {err.strerror or err}", where=where)
