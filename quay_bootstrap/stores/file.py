"""conf/stack from a local or NFS-mounted directory (file:///DIR), for debugging and on-premises use."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import List

from quay_bootstrap.errors import SourceError, TransientError
from quay_bootstrap.stores import Download, ObjectInfo

# An NFS server that is away shows up as these; worth retrying, unlike a missing directory.
_TRANSIENT_ERRNOS = {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EHOSTDOWN,
                     errno.EHOSTUNREACH}


class FileSource:
    """Every regular file below a directory; symlinks to files are read through."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path("/" + url.partition("://")[2].lstrip("/"))

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
