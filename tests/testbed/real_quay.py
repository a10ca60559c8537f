"""Real Quay images, built from Quay's own source (../shared/quay) on a debootstrap bookworm.

One image per release (v3.17.4, v3.18.0), REGISTRY/projectquay/quay:TAG, without `docker build`:
- a base root file system (debootstrap minbase with python3, nginx-light, the client libraries
  Quay's compiled modules link to), cached as a tar and imported once per dockerd;
- one layer per release: `/opt/app-root` (a venv with Quay's requirements.txt, built on this host
  at that same path inside a private mount namespace, since a venv is not relocatable) and
  `/quay-registry` (Quay's source with the patches below), cached as a tar keyed by the
  archive's sha256, committed with the settings of Quay's Dockerfile (USER 1001, its VOLUMEs
  and ports, `dumb-init -- quay-entrypoint.sh`, CMD `registry`).

What differs from upstream's image, each for a reason (`PATCHES`, applied to the source tree):
- Debian's Python is 3.11 (upstream's UBI image has 3.12): certs_install.sh names the certifi
  path with the version.
- Debian has no `update-ca-trust` (p11-kit, RHEL): a shim of that name does its `extract -o DIR`
  with Debian's bundle, so certs_install.sh runs unchanged under its `set -e`.
- The Go config-tool is not built (it needs Go 1.25; Debian 12 has 1.19): a node must be run
  with `IGNORE_VALIDATION=true`, and the stand-in keeps the online validation.
- Test bed only: every node shares this host's network, so `QB_HTTP_PORT`/`QB_HTTPS_PORT`, when
  set, move nginx's 8080/8443 (7443 and 55443 move with 8443, +1 and +2); unset, Quay's own.

`python -m tests.testbed quay-image v3.18.0 --push 127.0.0.1:PORT/REPO` builds and pushes one
and prints the pushed digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tests.e2e.machine import CACHE, REPO
from tests.testbed import bed
from tests.testbed.standin_rootfs import debootstrap_tar

SOURCES = Path(os.environ.get("QB_QUAY_SOURCES", REPO.parent / "shared" / "quay"))
RELEASES = {"v3.17.4": "quay-v3.17.4.tar.gz", "v3.18.0": "quay-v3.18.0.tar.gz"}
REPOSITORY = "projectquay/quay"
BASE_REPOSITORY = "qb-real-quay-base"
VENV = "/opt/app-root"
# What Quay's compiled modules link to at run time (psycopg2, python-ldap, python-magic, Pillow),
# nginx, and what its init scripts call (curl, openssl, csplit from coreutils).
PACKAGES = ["python3", "libpq5", "libldap-2.5-0", "libsasl2-2", "libmagic1", "libjpeg62-turbo",
            "nginx-light", "curl", "openssl", "ca-certificates", "procps"]
PRUNE = ["var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
         "usr/share/locale", "usr/share/info"]
# What the host needs to build the venv (also in tests/testbed/install-debian.sh).
BUILD_PACKAGES = ["gcc", "python3-dev", "python3-venv", "libpq-dev", "libldap2-dev", "libsasl2-dev",
                  "libssl-dev", "libffi-dev", "libjpeg-dev", "zlib1g-dev"]
# The three requirements that upstream takes from GitHub, from ../shared/quay/deps.
VENDORED = {"aniso8601": "aniso8601-fake", "py-bitbucket": "py-bitbucket",
            "supervisor-stdout": "supervisor-stdout"}

UPDATE_CA_TRUST = """#!/bin/sh
# quay-bootstrap test bed: Debian has update-ca-certificates, not RHEL's update-ca-trust.
# certs_install.sh calls `update-ca-trust extract -o DIR` (UBI 9) under set -e: write Debian's
# bundle and the anchors it copied into DIR, where that script then moves it.
out=/etc/pki/ca-trust/extracted
while [ $# -gt 0 ]; do case "$1" in -o) out=$2; shift;; esac; shift; done
mkdir -p "$out/pem"
cat /etc/ssl/certs/ca-certificates.crt /etc/pki/ca-trust/source/anchors/* \
  > "$out/pem/tls-ca-bundle.pem" 2>/dev/null
exit 0
"""

PORT_PATCH = """
# quay-bootstrap test bed: the nodes of a test share this host's network; QB_HTTP_PORT and
# QB_HTTPS_PORT move nginx's 8080 and 8443 (7443 and 55443 with 8443: +1, +2). Unset: Quay's.
if [ -n "${QB_HTTP_PORT:-}" ] || [ -n "${QB_HTTPS_PORT:-}" ]; then
  h=${QB_HTTP_PORT:-8080} s=${QB_HTTPS_PORT:-8443}
  sed -i -E -e "s/listen (\\[::\\]:)?8080 /listen \\1$h /" \\
    -e "s/listen (\\[::\\]:)?8443 /listen \\1$s /" \\
    -e "s/listen (\\[::\\]:)?7443 /listen \\1$((s + 1)) /" \\
    -e "s/listen (\\[::\\]:)?55443 /listen \\1$((s + 2)) /" \\
    "${QUAYCONF:-conf}"/nginx/*.conf
fi
"""

# (file under the source tree, old text, new text): each must match, or the build fails.
PATCHES = [
    ("conf/init/certs_install.sh", "/opt/app-root/lib/python3.12/site-packages",
     "/opt/app-root/lib/python3.11/site-packages"),
]
APPEND = [("conf/init/nginx_conf_create.sh", PORT_PATCH)]

CHANGES = [
    "USER 1001",
    'VOLUME ["/datastorage", "/tmp", "/conf/stack"]',
    "EXPOSE 8080 8443 7443 9091 55443",
    "WORKDIR /quay-registry",
    f"ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV QUAYDIR=/quay-registry QUAYCONF=/quay-registry/conf QUAYRUN=/quay-registry/conf "
    "QUAYPATH=/quay-registry PYTHONPATH=/quay-registry PYTHONUNBUFFERED=1 "
    "PYTHONIOENCODING=UTF-8 LANG=C.UTF-8 LC_ALL=C.UTF-8 TZ=UTC",
    'ENTRYPOINT ["dumb-init", "--", "/quay-registry/quay-entrypoint.sh"]',
    'CMD ["registry"]',
]


class Unavailable(bed.TestbedError):
    """Quay's source for a release is not on this machine."""


def archive(tag: str) -> Path:
    path = SOURCES / RELEASES[tag]
    if not path.exists():
        raise Unavailable(
            f"Quay's source for {tag} is not at {path} (the shared folder beside this clone, or "
            f"QB_QUAY_SOURCES): put tag {tag} of quay/quay there as {RELEASES[tag]} to run the "
            "real-Quay tests")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _recipe_key() -> str:
    recipe = json.dumps([PACKAGES, PRUNE, VENDORED, UPDATE_CA_TRUST, PATCHES, APPEND, CHANGES])
    return hashlib.sha256(recipe.encode()).hexdigest()[:8]


def rootfs_tar(cache: Path = CACHE) -> Path:
    """The cached base root file system; debootstrap (about a minute) when missing."""
    def finish(root: Path) -> None:
        # As Quay's Dockerfile: nginx logs to the container's output.
        for name in ("access.log", "error.log"):
            log = root / "var/log/nginx" / name
            log.unlink(missing_ok=True)
            log.symlink_to("/dev/stdout")

    return debootstrap_tar("real-quay", PACKAGES, PRUNE, cache, finish)


def _requirements(src: Path, vendor: Path) -> str:
    """requirements.txt with upstream's GitHub lines pointing at the local copies."""
    lines = []
    for line in (src / "requirements.txt").read_text().splitlines():
        name = line.split(" @ ", 1)[0].strip()
        if " @ git+" in line:
            if name not in VENDORED:
                raise bed.TestbedError(f"requirements.txt takes {name} from GitHub; vendor it")
            line = f"{name} @ file://{vendor / VENDORED[name]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def _build_venv(src: Path, stage: Path, log: Path) -> None:
    """Quay's requirements in STAGE/opt/app-root, built as /opt/app-root in a mount namespace."""
    vendor = stage.parent / "vendor"
    vendor.mkdir(exist_ok=True)
    for name in VENDORED.values():
        with tarfile.open(SOURCES / "deps" / f"{name}.tar.gz") as tar:
            tar.extractall(vendor)
    req = stage.parent / "requirements.txt"
    req.write_text(_requirements(src, vendor))
    pins = [ln for ln in req.read_text().splitlines() if re.match(r"^(setuptools|wheel)==", ln)]
    target = stage / VENV.lstrip("/")
    target.mkdir(parents=True)
    pip = f"{VENV}/bin/pip install --progress-bar off --disable-pip-version-check"
    script = "\n".join([
        "set -euxo pipefail",
        # /opt of this namespace only: the host's /opt is left as it is.
        "mount -t tmpfs tmpfs /opt", f"mkdir {VENV}", f"mount --bind {target} {VENV}",
        f"/usr/bin/python3 -m venv {VENV}", f"{pip} -U pip", f"{pip} {' '.join(pins)}",
        f"{pip} -r {req}", f"{VENV}/bin/pip check || true",
    ])
    with log.open("w") as out:
        done = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise bed.TestbedError(f"building Quay's venv failed (log {log}):\n{tail}")


def _patch(src: Path) -> None:
    for name, old, new in PATCHES:
        path = src / name
        text = path.read_text()
        if old not in text:
            raise bed.TestbedError(f"patch for {name} no longer matches Quay's source: {old!r}")
        path.write_text(text.replace(old, new))
    for name, extra in APPEND:
        path = src / name
        path.write_text(path.read_text() + extra)


def layer_tar(tag: str, cache: Path = CACHE) -> Path:
    """The cached layer of one release (venv + patched source); about 3 minutes when missing."""
    source = archive(tag)
    key = f"{_sha256(source)[:16]}-{_recipe_key()}"
    tar = cache / f"real-quay-{tag}-{key}.tar"
    if tar.exists():
        return tar
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"real-quay-{tag}-", dir=cache))
    try:
        stage = work / "root"
        src = stage / "quay-registry"
        src.mkdir(parents=True)
        subprocess.run(["tar", "-xzf", str(source), "-C", str(src), "--strip-components=1"], check=True)
        _patch(src)
        _build_venv(src, stage, cache / f"real-quay-{tag}-pip.log")
        shim = stage / "usr/local/bin/update-ca-trust"
        shim.parent.mkdir(parents=True)
        shim.write_text(UPDATE_CA_TRUST)
        shim.chmod(0o755)
        partial = tar.with_suffix(".partial")
        _write_layer(stage, partial)
        partial.rename(tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tar


def _write_layer(stage: Path, out: Path) -> None:
    """The layer's tar: owners and modes as Quay's Dockerfile sets them (1001:0, group = user)."""
    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        info.uid, info.gid = (1001, 0) if info.name.startswith("quay-registry") else (0, 0)
        if info.name.startswith("quay-registry"):
            info.mode |= (info.mode & 0o700) >> 3  # chmod g=u
        return info

    with tarfile.open(out, "w") as tar:
        tar.add(stage / "quay-registry", "quay-registry", filter=owned)
        tar.add(stage / VENV.lstrip("/"), VENV.lstrip("/"), filter=owned)
        tar.add(stage / "usr/local/bin/update-ca-trust", "usr/local/bin/update-ca-trust", filter=owned)
        for name, mode in [("quay-registry/conf/stack", 0o775), ("datastorage", 0o775),
                           ("certificates", 0o775), ("var/lib/quay", 0o775),
                           ("etc/pki", 0o775), ("etc/pki/ca-trust", 0o775),
                           ("etc/pki/ca-trust/source", 0o775),
                           ("etc/pki/ca-trust/source/anchors", 0o775),
                           ("etc/pki/ca-trust/extracted", 0o775)]:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, 1001, 0
            info.mtime = int(time.time())
            tar.addfile(info)
        link = tarfile.TarInfo("conf")
        link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "/quay-registry/conf", int(time.time())
        tar.addfile(link)


def image(client, tag: str, repository: str) -> str:
    """REPOSITORY:TAG of real Quay TAG in CLIENT's dockerd (made when missing or stale)."""
    layer = layer_tar(tag)
    base = bed.import_base(client, rootfs_tar(), BASE_REPOSITORY)
    reference = f"{repository}:{tag}"
    key = f"{base}/{layer.stem}"
    try:
        current = client.images.get(reference).labels.get("real-quay.key")
    except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound
        current = None
    if current != key:
        created = client.api.create_container(base, ["/bin/true"])
        try:
            with layer.open("rb") as data:
                client.api.put_archive(created["Id"], "/", data)
            client.api.commit(created["Id"], repository=repository, tag=tag,
                              changes=[*CHANGES, f"LABEL real-quay.key={key}"])
        finally:
            client.api.remove_container(created["Id"], force=True)
    return reference


def build(client, registry: str, tags: tuple[str, ...] = tuple(RELEASES)) -> dict[str, str]:
    """Make and push REGISTRY/projectquay/quay:TAG for each release; return {tag: reference}."""
    made = {}
    for tag in tags:
        reference = image(client, tag, f"{registry}/{REPOSITORY}")
        bed.push_image(client, *reference.rsplit(":", 1))
        made[tag] = reference
    return made


def heads(tag: str) -> tuple[str, int]:
    """(alembic head revision, number of migrations) of release TAG, read from its source."""
    with tarfile.open(archive(tag)) as tar:
        revisions, downs = set(), set()
        for member in tar:
            if re.search(r"/data/migrations/versions/[^/]+\.py$", member.name):
                text = tar.extractfile(member).read().decode()
                rev = re.search(r'^revision\s*=\s*"([0-9a-f]+)"', text, re.M)
                down = re.search(r'^down_revision\s*=\s*"([0-9a-f]+)"', text, re.M)
                if rev:
                    revisions.add(rev.group(1))
                if down:
                    downs.add(down.group(1))
    (head,) = revisions - downs
    return head, len(revisions)


def main(argv: list[str] | None = None) -> int:
    import argparse

    import docker

    parser = argparse.ArgumentParser(prog="python -m tests.testbed quay-image",
                                     description="Build real Quay TAG and push it to REPOSITORY.")
    parser.add_argument("tag", choices=sorted(RELEASES))
    parser.add_argument("--push", metavar="HOST:PORT/REPO", required=True)
    parser.add_argument("--docker-host", default=os.environ.get("DOCKER_HOST"),
                        help="the dockerd to build in (default: DOCKER_HOST)")
    args = parser.parse_args(argv)
    client = docker.DockerClient(base_url=args.docker_host) if args.docker_host else docker.from_env()
    try:
        reference = image(client, args.tag, args.push)
        digest = bed.push_image(client, *reference.rsplit(":", 1))
    except bed.TestbedError as err:
        print(f"quay-image: {err}", file=sys.stderr)
        return 1
    print(digest)
    return 0

