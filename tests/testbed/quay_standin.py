"""The stand-in Quay image (tests/testbed/standin/registry.py) on a debootstrap bookworm: build, run, inspect.

Three versions, each with its own schema revision chain, are pushed to the bed's registry as
REGISTRY/projectquay/quay:vX.Y.Z. No `docker build`: the cached root file system
(standin_rootfs.py) is imported once per dockerd as a base image; each version is that base plus
the entry-point script, its VERSION and its revisions, committed with Quay's Dockerfile settings
(USER 1001, the VOLUMEs, EXPOSE 8080 8443, entry point `registry`).

A test starts one with `start(client, reference, stack_dir, http_port=..., ...)`, writes its
conf/stack with `write_stack(stack_dir, config(state, database=..., bucket=...))`, fails or hangs
a local service with `set_local(control_dir, "web_gunicorn", "fail")`, and reads the database's
revision with `db_revision(dsn)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

from tests.testbed import bed
from tests.testbed.standin_rootfs import rootfs_tar

REPOSITORY = "projectquay/quay"
BASE_REPOSITORY = "qb-quay-standin-base"
SCRIPT = Path(__file__).with_name("standin") / "registry.py"
# Each release adds one migration to the previous one's chain; the ids are the stand-in's own.
_STEPS = [
    ("v3.9.0", "0cdd1f27a450", "add subject backfilled index"),
    ("v3.10.0", "946f0e90f9c9", "create manifestsubject table"),
    ("v3.11.0", "b4da5b09c8df", "repository autoprune policy"),
]


def _chain(upto: int) -> list[dict[str, Any]]:
    """The migrations a release ships: every step up to and including its own."""
    return [{"revision": rev, "down": _STEPS[j - 1][1] if j else None, "message": msg,
             "table": "standin_" + tag.replace(".", "_")}
            for j, (tag, rev, msg) in enumerate(_STEPS[: upto + 1])]


VERSIONS = {tag: _chain(i) for i, (tag, _, _) in enumerate(_STEPS)}
HEADS = {tag: chain[-1]["revision"] for tag, chain in VERSIONS.items()}
CHANGES = [
    "USER 1001",
    'VOLUME ["/datastorage", "/tmp", "/conf/stack"]',
    "EXPOSE 8080 8443",
    "WORKDIR /quay-registry",
    "ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
    'ENTRYPOINT ["/usr/bin/python3", "/quay-registry/standin.py"]',
    'CMD ["registry"]',
]


def _version_files(tag: str) -> bytes:
    """A tar of what one version adds to the base: the script, VERSION, revisions, owned dirs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, data=None, mode=0o644, uid=0):
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.uid, info.gid = int(time.time()), mode, uid, 0
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

        add("quay-registry", mode=0o755)
        add("quay-registry/standin.py", SCRIPT.read_bytes())
        add("quay-registry/VERSION", f"{tag}\n".encode())
        add("quay-registry/revisions.json", json.dumps(VERSIONS[tag], indent=1).encode())
        # Quay's image: /datastorage and /conf/stack belong to 1001, group 0.
        add("datastorage", mode=0o775, uid=1001)
        add("conf", mode=0o755)
        add("conf/stack", mode=0o775, uid=1001)
    return buf.getvalue()


def build(client, registry: str, tags: tuple[str, ...] = tuple(VERSIONS)) -> dict[str, str]:
    """Make and push REGISTRY/projectquay/quay:TAG for each tag; return {tag: reference}.

    The first call on a dockerd imports the cached root file system (seconds; the first
    debootstrap ever takes about a minute); each version is then a small layer on top.
    """
    base = bed.import_base(client, rootfs_tar(), BASE_REPOSITORY)
    script_key = hashlib.sha256(SCRIPT.read_bytes()).hexdigest()[:12]
    made = {}
    for tag in tags:
        repository = f"{registry}/{REPOSITORY}"
        reference = f"{repository}:{tag}"
        key = f"{base}/{script_key}"
        try:
            current = client.images.get(reference).labels.get("quay-standin.key")
        except Exception:  # noqa: BLE001 - docker.errors.ImageNotFound
            current = None
        if current != key:
            created = client.api.create_container(base, ["/bin/true"])
            try:
                client.api.put_archive(created["Id"], "/", _version_files(tag))
                client.api.commit(created["Id"], repository=repository, tag=tag,
                                  changes=[*CHANGES, f"LABEL quay-standin.key={key}"])
            finally:
                client.api.remove_container(created["Id"], force=True)
        bed.push_image(client, repository, tag)
        made[tag] = reference
    return made


# ---------------------------------------------------------------- conf/stack and the bed's services


def create_database(state: dict[str, Any]) -> str:
    """A new empty database on the bed's PostgreSQL; returns its DSN."""
    import psycopg2

    name = f"quay_{uuid.uuid4().hex[:10]}"
    conn = psycopg2.connect(state["postgres_dsn"], connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()
    return f"postgresql://{state['postgres_user']}@127.0.0.1:{state['postgres_port']}/{name}"


def drop_database(state: dict[str, Any], dsn: str) -> None:
    import psycopg2

    conn = psycopg2.connect(state["postgres_dsn"], connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")
    finally:
        conn.close()


def db_revision(dsn: str) -> str | None:
    """The alembic revision recorded in that database, or None (no table or no row)."""
    import psycopg2

    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass('alembic_version')")
            if cur.fetchone()[0] is None:
                return None
            cur.execute("SELECT version_num FROM alembic_version")
            row = cur.fetchone()
            return row[0] if row else None
    finally:
        conn.close()


def repair(dsn: str) -> list[str]:
    """Undo a migration killed half-way (drop the tables past the recorded revision); return them.

    What an operator does by hand after such a crash; until then every start fails.
    """
    import psycopg2

    current = db_revision(dsn)
    chain = VERSIONS[list(VERSIONS)[-1]]
    done = [s["revision"] for s in chain]
    keep = done[: done.index(current) + 1] if current in done else []
    dropped = []
    conn = psycopg2.connect(dsn, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for step in chain:
                if step["revision"] not in keep:
                    cur.execute(f"DROP TABLE IF EXISTS {step['table']}")
                    dropped.append(step["table"])
    finally:
        conn.close()
    return dropped


def config(state: dict[str, Any], *, database: str, bucket: str, **overrides: Any) -> dict[str, Any]:
    """A Quay config.yaml (as a dict) on the bed's PostgreSQL DATABASE (a DSN), Redis and a
    SeaweedFS BUCKET; plain HTTP unless overridden."""
    redis = {"host": "127.0.0.1", "port": state["redis_port"]}
    conf = {
        "SERVER_HOSTNAME": "quay.example.com",
        "PREFERRED_URL_SCHEME": "http",
        "DB_URI": database,
        "BUILDLOGS_REDIS": dict(redis),
        "USER_EVENTS_REDIS": dict(redis),
        # S3Storage takes no is_secure (real Quay: a TypeError at import): a full endpoint_url,
        # and no s3_region: with it, real Quay ignores endpoint_url and goes to AWS (its
        # /health/endtoend storage check did, before this was found).
        "DISTRIBUTED_STORAGE_CONFIG": {"default": ["S3Storage", {
            "endpoint_url": state["seaweedfs_endpoint"], "s3_bucket": bucket,
            "storage_path": "/datastorage/registry",
            "s3_access_key": state["seaweedfs_access_key"],
            "s3_secret_key": state["seaweedfs_secret_key"]}]},
        "DISTRIBUTED_STORAGE_PREFERENCE": ["default"],
        "AUTHENTICATION_TYPE": "Database",
        "SETUP_COMPLETE": True,
        "TESTING": False,
        "SECRET_KEY": "standin-secret-key",
        "DATABASE_SECRET_KEY": "standin-database-secret-key",
        "DEFAULT_TAG_EXPIRATION": "2w",
        "TAG_EXPIRATION_OPTIONS": ["2w"],
    }
    conf.update(overrides)
    return {k: v for k, v in conf.items() if v is not None}


def create_bucket(state: dict[str, Any]) -> str:
    """A new bucket on the bed's SeaweedFS; returns its name."""
    name = f"quay-{uuid.uuid4().hex[:10]}"
    client = bed.seaweedfs_client(state)
    try:
        client.create_bucket(Bucket=name)
    finally:
        client.close()
    return name


def write_stack(directory: Path, conf: dict[str, Any], files: dict[str, bytes] | None = None) -> Path:
    """Write config.yaml (and FILES) into DIRECTORY, readable by the image's user 1001."""
    import yaml

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(conf))
    for name, data in (files or {}).items():
        (directory / name).write_bytes(data)
    _open_up(directory)
    return directory


def _open_up(directory: Path) -> None:
    # pytest's tmp_path is 0700 root: the container's user 1001 must traverse it and read files.
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    for parent in directory.parents:
        if parent == Path("/") or parent.stat().st_mode & 0o005 == 0o005:
            continue
        parent.chmod(parent.stat().st_mode | 0o005)


def tls_pair(hostname: str = "quay.example.com") -> dict[str, bytes]:
    """A self-signed ssl.cert/ssl.key for HOSTNAME (openssl)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", f"/CN={hostname}", "-addext", f"subjectAltName=DNS:{hostname}",
                        "-keyout", f"{tmp}/ssl.key", "-out", f"{tmp}/ssl.cert"],
                       check=True, capture_output=True)
        return {name: Path(tmp, name).read_bytes() for name in ("ssl.cert", "ssl.key")}


def set_local(control: Path, service: str, how: str | None) -> None:
    """Make a local service (web_gunicorn, registry_gunicorn, service_key, disk_space) "fail",
    "hang", or healthy again (None); read by the stand-in on every health request."""
    path = control / "local"
    lines = [ln for ln in (path.read_text().splitlines() if path.exists() else [])
             if ln.split()[:1] != [service]]
    if how:
        lines.append(f"{service} {how}")
    tmp = control / "local.tmp"
    tmp.write_text("".join(f"{ln}\n" for ln in lines))
    tmp.chmod(0o644)
    tmp.replace(path)


# ---------------------------------------------------------------- containers


def start(client, reference: str, stack_dir: Path, *, http_port: int, https_port: int | None = None,
          control_dir: Path | None = None, command: str = "registry", name: str | None = None,
          migration_seconds: float = 0.0, env: dict[str, str] | None = None):
    """Run the stand-in REFERENCE with STACK_DIR as /conf/stack, host networking, on 127.0.0.1.

    Args:
        http_port, https_port: what 8080 and 8443 become (tests run several on one host).
        control_dir: mounted at /control; `set_local` writes there.
        command: "registry" (validate, migrate, serve) or "registry-nomigrate".
        migration_seconds: how long each migration step takes.
        env: more environment (e.g. AWS_ENDPOINT_URL for RDSAwareHealthCheck on moto).

    Returns:
        The docker Container (detached; remove it with `.remove(force=True, v=True)`).
    """
    environment = {"QUAY_STANDIN_HTTP_PORT": str(http_port),
                   "QUAY_STANDIN_MIGRATION_SECONDS": str(migration_seconds)}
    if https_port is not None:
        environment["QUAY_STANDIN_HTTPS_PORT"] = str(https_port)
    environment.update(env or {})
    volumes = {str(stack_dir): {"bind": "/conf/stack", "mode": "ro"}}
    if control_dir is not None:
        control_dir.mkdir(parents=True, exist_ok=True)
        control_dir.chmod(0o777)
        _open_up(control_dir)
        volumes[str(control_dir)] = {"bind": "/control", "mode": "rw"}
    return client.containers.run(
        reference, [command], name=name or f"quay-standin-{uuid.uuid4().hex[:8]}",
        network_mode="host", detach=True, environment=environment, volumes=volumes)


def wait_exit(container, timeout: float = 60) -> int:
    """The container's exit code once it has stopped."""
    return container.wait(timeout=timeout)["StatusCode"]


def logs(container) -> str:
    return container.logs().decode(errors="replace")


def wait_serving(container, timeout: float = 60) -> None:
    """Until the stand-in says it serves; AssertionError with its logs if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        text = logs(container)
        if "serving on" in text:
            return
        if container.status in ("exited", "dead"):
            raise AssertionError(f"stand-in exited before serving:\n{text}")
        time.sleep(0.1)
    raise AssertionError(f"stand-in not serving after {timeout} s:\n{logs(container)}")


def free_port() -> int:
    return bed._free_ports(1)[0]


if __name__ == "__main__":  # build into a running bed: python -m tests.testbed.quay_standin DIR
    import sys

    import docker

    state = bed.load(sys.argv[1])
    began = time.monotonic()
    made = build(docker.DockerClient(base_url=state["docker_host"]), state["registry"])
    print(json.dumps(made, indent=1), f"in {time.monotonic() - began:.1f} s")
    os._exit(0)
