"""A local or NFS-mounted directory (file:///DIR), for debugging and on-premises use: source and leases."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Tuple

from quay_bootstrap.errors import SourceError, TransientError
from quay_bootstrap.stores import Download, ObjectInfo

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
    """Every regular file below a directory; symlinks to files are read through."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.url = url
        self.root = directory(url)

    def list(self) -> List[ObjectInfo]:
        if not self.root.is_dir():
            raise SourceError("the stack directory does not exist or is not a directory",
                              where=self.url, hint="Check stack.source (file:///DIR)")
        objects = []
        try:
            for folder, dirs, files in os.walk(self.root, onerror=_raise):
                dirs.sort()
                for name in sorted(files):
                    path = Path(folder, name)
                    if not path.is_file():
                        continue  # sockets, FIFOs, dangling links: not part of a stack
                    if path.is_symlink() and not _inside(path, self.root):
                        raise SourceError(f"refusing the whole stack: {path} links outside the "
                                          "stack directory", where=self.url,
                                          hint="Copy the file into the directory instead")
                    st = path.stat()
                    key = path.relative_to(self.root).as_posix()
                    objects.append(ObjectInfo(key=key, size=st.st_size,
                                              token=f"{st.st_mtime_ns}:{st.st_ino}:{st.st_size}"))
        except OSError as err:
            raise _classify(err, self.url) from err
        return objects

    def read(self, obj: ObjectInfo) -> Download:
        try:
            return Download(data=(self.root / obj.key).read_bytes())
        except FileNotFoundError as err:
            raise TransientError(f"{self.url}/{obj.key} changed while it was being fetched") from err
        except OSError as err:
            raise _classify(err, f"{self.url}/{obj.key}") from err

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except FileNotFoundError as err:
            raise SourceError("the file does not exist", where=f"{self.url}/{key}",
                              hint="Check the URL") from err
        except OSError as err:
            raise _classify(err, f"{self.url}/{key}") from err


class FileLeases:
    """Lease files in a directory: created exclusively, replaced by compare-token under a lock."""

    def __init__(self, url: str, client: Any = None) -> None:
        self.url = url
        self.root = directory(url)

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        try:
            with open(self.root / key, "rb") as lease:
                # Inode and mtime from the file just read, plus its content: a replace renames a
                # new inode in, and coarse mtimes alone can repeat within one clock tick.
                st = os.fstat(lease.fileno())
                data = lease.read()
        except FileNotFoundError:
            return None
        digest = hashlib.sha256(data).hexdigest()[:16]
        return data, f"{st.st_ino}:{st.st_mtime_ns}:{digest}"

    def create(self, key: str, data: bytes) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
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
        self.root.mkdir(parents=True, exist_ok=True)
        # Compare and rename under one lock, so two nodes taking over the same expired lease
        # cannot both see the old token and both win.
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            got = self.get(key)
            if got is None or got[1] != token:
                return False
            os.replace(self._write_aside(key, data), self.root / key)
        return True

    def delete(self, key: str) -> None:
        (self.root / key).unlink(missing_ok=True)

    def _write_aside(self, key: str, data: bytes) -> Path:
        # A random name: nodes sharing the directory over NFS may well share a PID.
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=self.root)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        return Path(tmp)


# What the registry in stores/__init__.py looks up.
Source, Leases = FileSource, FileLeases


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _raise(err: OSError) -> None:
    raise err


def _classify(err: OSError, where: str) -> Exception:
    if err.errno in _TRANSIENT_ERRNOS:
        return TransientError(f"{where}: {err.strerror}")
    if isinstance(err, PermissionError):
        return SourceError("permission denied reading the stack", where=where,
                           hint="Make the directory readable by the agent (it runs as root)")
    return SourceError(f"cannot read the stack: {err.strerror or err}", where=where)
