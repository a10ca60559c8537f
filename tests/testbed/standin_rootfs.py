"""The stand-in Quay's root file system: a debootstrap bookworm with python3 and Quay's clients, cached."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from tests.e2e.machine import CACHE, _mirror

# Quay's own clients for the online checks: psycopg2 (PostgreSQL), redis, PyYAML (config.yaml).
# The storage and RDS calls are plain HTTP with a SigV4 signature, so no boto3 (its Debian
# package would more than double the image).
PACKAGES = ["python3", "python3-psycopg2", "python3-redis", "python3-yaml", "ca-certificates"]
# Not needed at run time; dropping them halves the tar (and the push).
PRUNE = ["var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/locale", "usr/share/info"]


def rootfs_tar(cache: Path = CACHE) -> Path:
    """The cached tar of the stand-in's base root file system; built (about a minute) when missing."""
    return debootstrap_tar("standin", PACKAGES, PRUNE, cache)


def debootstrap_tar(name: str, packages, prune, cache: Path = CACHE,
                    finish: Callable[[Path], None] = lambda root: None) -> Path:
    """CACHE/NAME-bookworm-KEY.tar: a debootstrap minbase bookworm with PACKAGES, PRUNE emptied,
    FINISH(root) applied; KEY follows the packages and the pruning. Built when missing."""
    key = hashlib.sha256(" ".join([*packages, *prune]).encode()).hexdigest()[:12]
    tar = cache / f"{name}-bookworm-{key}.tar"
    if tar.exists():
        return tar
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"{name}-rootfs-{key}.tmp"
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(packages)}",
                    "bookworm", str(root), _mirror()], check=True, stdout=subprocess.DEVNULL)
    for sub in prune:
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True, exist_ok=True)
    finish(root)
    partial = tar.with_suffix(".partial")
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], check=True)
    partial.rename(tar)
    shutil.rmtree(root, ignore_errors=True)
    return tar


if __name__ == "__main__":
    print(rootfs_tar())
