"""`quay-bootstrap fetch` against real stores: what lands on disk, and that bad input never costs
the live stack.

S3 runs on two servers: moto and SeaweedFS (a real S3-compatible store that checks signatures,
keeps connections alive and refuses or rewrites some keys moto accepts). Tests that need a feature
only moto has (IAM enforcement) say so in their name or docstring.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest
import yaml

from tests.integration.faulty_proxy import Fault, FaultyProxy
from tests.integration.stores_fixtures import CA_VARIABLES, StoreProxy
from tests.testbed.stacks import quay_config, sample_stack

# seaweedfs_backend, s3_store (moto and SeaweedFS), seaweedfs_tls
pytest_plugins = ["tests.integration.stores_fixtures"]


@pytest.fixture(params=["s3", "seaweedfs", "gcs", "file"])
def backend(request):
    """The same behaviour on every kind of store; S3 on moto ("s3") and on SeaweedFS."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(params=["s3", "seaweedfs", "gcs"])
def cloud_backend(request):
    """The same behaviour on every object store (not a directory); S3 on moto and SeaweedFS."""
    return request.getfixturevalue(f"{request.param}_backend")


def applied(agent, backend, files=None, **stack):
    """Upload a good stack, fetch it, and return the live (version, files)."""
    backend.upload(files or sample_stack())
    agent.write_config(backend, **stack)
    code, out, err = agent.run("fetch")
    assert code == 0, err
    return agent.live()


def test_fetch_puts_the_stack_live_with_quay_ownership(agent, backend):
    files = sample_stack()
    backend.upload(files)
    agent.write_config(backend)
    code, out, err = agent.run("fetch")
    assert code == 0, err
    version, live = agent.live()
    assert live == files
    assert f"stack  applied    version {version[:12]}  21 files" in out
    assert "(21 downloaded, 0 reused)" in out
    folder = agent.stack_dir / "current"
    for path in [folder.resolve(), *folder.resolve().rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), path
        assert (path.stat().st_uid, path.stat().st_gid) == (1001, 0), path
    assert os.readlink(agent.stack_dir / "last-known-good") == os.readlink(folder)
    events = [json.loads(line) for line in err.splitlines()]
    applied_event = [e for e in events if e["event"] == "stack.applied"][0]
    assert applied_event["version"] == version and applied_event["files"] == 21
    # A clean fetch warns of nothing but the bed's weak S3 key ("testing": 7 characters).
    assert [e for e in events if e["level"] != "info" and e["event"] != "secrets.weak"] == []


def test_unchanged_store_downloads_nothing_and_touches_nothing(agent, backend):
    version, _ = applied(agent, backend)
    link = agent.stack_dir / "current"
    before = (os.lstat(link).st_mtime_ns, os.lstat(link).st_ino)
    code, out, _ = agent.run("fetch")
    assert code == 0
    assert "stack  unchanged" in out and "(0 downloaded, 21 reused)" in out
    assert (os.lstat(link).st_mtime_ns, os.lstat(link).st_ino) == before
    assert [p.name for p in (agent.stack_dir / "versions").iterdir()] == [version]


def test_one_changed_object_makes_a_new_version_and_old_ones_are_pruned(agent, backend):
    first, _ = applied(agent, backend)
    versions = [first]
    for i in range(4):
        backend.put("robots.txt", f"User-agent: *\nDisallow: /{i}\n".encode())
        code, out, err = agent.run("fetch")
        assert code == 0, err
        assert "(1 downloaded, 20 reused)" in out
        version, live = agent.live()
        assert live["robots.txt"] == f"User-agent: *\nDisallow: /{i}\n".encode()
        versions.append(version)
    assert len(set(versions)) == 5
    kept = sorted(p.name for p in (agent.stack_dir / "versions").iterdir())
    assert kept == sorted(versions[-3:])
    kept_manifests = sorted(p.stem for p in (agent.stack_dir / "manifests").glob("*.json"))
    assert kept_manifests == kept


def test_a_deleted_object_disappears_from_the_live_stack(agent, backend):
    applied(agent, backend)
    backend.delete("robots.txt")
    assert agent.run("fetch")[0] == 0
    assert "robots.txt" not in agent.live()[1]


def test_same_content_reuploaded_is_the_same_version(agent, cloud_backend):
    backend = cloud_backend
    version, _ = applied(agent, backend)
    backend.put("robots.txt", sample_stack()["robots.txt"])  # new ETag/generation, same bytes
    code, out, _ = agent.run("fetch")
    assert code == 0 and "unchanged" in out and agent.live()[0] == version
    code, out, _ = agent.run("fetch")
    assert "(0 downloaded, 21 reused)" in out  # the manifest learnt the new token


# --- bad input: a clear error, and the live stack untouched -------------------------------

def refused(agent, *, code, says):
    """Run a fetch that must fail and prove the live stack is exactly what it was."""
    before = agent.live()
    got, out, err = agent.run("fetch")
    assert got == code, err
    for text in says:
        assert text in err, err
    assert agent.live() == before
    assert agent.staging() == []
    return err


@pytest.mark.parametrize("kind,bad_key,why", [
    ("s3", "../escape.yaml", "'..'"),  # the GCS emulator normalises '..'; a directory can't hold it
    ("s3", "ctl\x01.crt", "control character"),
    ("seaweedfs", "ctl\x01.crt", "control character"),  # it refuses '..' and turns '\\' into '/'
    ("gcs", "ctl\x01.crt", "control character"),
    ("s3", "a\\b.crt", "backslash"),
    ("gcs", "a\\b.crt", "backslash"),
    ("file", "a\\b.crt", "backslash"),
])
def test_unsafe_key_refuses_the_whole_fetch(request, agent, kind, bad_key, why):
    backend = request.getfixturevalue(f"{kind}_backend")
    applied(agent, backend)
    backend.put(bad_key, b"x")
    try:
        refused(agent, code=1, says=["unsafe", repr(bad_key), why, backend.url])
    finally:
        backend.delete(bad_key)  # moto cannot list such a key back as XML when cleaning up


def test_missing_bucket_names_the_url(agent, backend):
    version, _ = applied(agent, backend)
    url = backend.url.replace("qb-test-", "qb-gone-") if backend.kind != "file" \
        else backend.url + "-gone"
    agent.write_config(backend, source=url)
    says = ["does not exist", url] if backend.kind == "file" else ["does not exist", "Check stack.source"]
    refused(agent, code=1, says=says)


def test_empty_prefix_names_the_url(agent, backend):
    applied(agent, backend)
    agent.write_config(backend, source=backend.url + "/nothing-here")
    if backend.kind == "file":
        (agent.config_path.parent / "source" / "nothing-here").mkdir()
    refused(agent, code=1, says=["no objects found", backend.url + "/nothing-here",
                                 "Check the bucket and prefix"])


def test_access_denied_names_the_url_and_what_to_check_moto_iam(agent, s3_backend, tmp_path):
    """moto only: a second moto that enforces IAM answers a real 403 to unknown credentials."""
    applied(agent, s3_backend)
    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        agent.write_config(s3_backend, source="s3://locked-bucket/conf/stack",
                           endpoint_url=f"http://127.0.0.1:{port}")
        refused(agent, code=1, says=["access denied", "s3://locked-bucket/conf/stack",
                                     "s3:ListBucket and s3:GetObject"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_unknown_keys_are_access_denied_on_seaweedfs(agent, seaweedfs_backend, monkeypatch):
    """SeaweedFS checks every signature: keys it does not know get InvalidAccessKeyId (403)."""
    applied(agent, seaweedfs_backend)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-seaweedfs-key")
    refused(agent, code=1, says=["access denied to the stack (InvalidAccessKeyId)",
                                 seaweedfs_backend.url, "s3:ListBucket and s3:GetObject"])


@pytest.mark.parametrize("limit,says", [
    ({"max_files": 21}, "more than stack.max_files (21) files"),
    ({"max_bytes": "2KiB"}, "more than stack.max_bytes (2048)"),
])
def test_over_the_limits(agent, backend, limit, says):
    applied(agent, backend)
    backend.put("extra_ca_certs/new.crt", b"x")  # make it a change, so the limit is checked
    agent.write_config(backend, **limit)
    refused(agent, code=1, says=[says, backend.url])


@pytest.mark.parametrize("kind", ["corrupt", "truncate"])
def test_a_bad_download_is_retried_then_succeeds(agent, s3_store, kind):
    files = sample_stack()
    s3_store.upload(files)
    with StoreProxy(s3_store.stack_options["endpoint_url"],
                    [Fault("robots.txt", kind, times=2)]) as proxy:
        agent.write_config(s3_store, endpoint_url=proxy.url)
        code, _, err = agent.run("fetch")
    assert code == 0, err
    assert agent.live()[1] == files
    assert proxy.faults[0].hits == 2


@pytest.mark.parametrize("with_sha256,kind", [(False, "corrupt"), (True, "corrupt"),
                                             (False, "truncate")],
                         ids=["etag-md5", "checksum-sha256", "truncated"])
def test_a_download_that_never_matches_is_refused(agent, s3_store, with_sha256, kind):
    version, _ = applied(agent, s3_store)
    s3_store.put("ssl.cert", b"-----BEGIN CERTIFICATE-----\nnew\n", sha256=with_sha256)
    with StoreProxy(s3_store.stack_options["endpoint_url"],
                    [Fault("ssl.cert", kind, times=99)]) as proxy:
        agent.write_config(s3_store, endpoint_url=proxy.url)
        refused(agent, code=1, says=["'ssl.cert' did not match the store's listing or checksum after 3",
                                     "re-upload"])


def test_gcs_corruption_is_caught_by_its_md5(agent, gcs_backend, gcs_endpoint, monkeypatch):
    applied(agent, gcs_backend)
    gcs_backend.put("ssl.cert", b"-----BEGIN CERTIFICATE-----\nnew\n")
    with FaultyProxy(gcs_endpoint, [Fault("ssl.cert", "corrupt", times=99)]) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        refused(agent, code=1, says=["'ssl.cert' did not match the store's listing or checksum"])


def test_an_overloaded_store_is_retried_with_backoff(agent, s3_store):
    files = sample_stack()
    s3_store.upload(files)
    with StoreProxy(s3_store.stack_options["endpoint_url"],
                    [Fault("list-type=2", "status", times=2)]) as proxy:
        agent.write_config(s3_store, endpoint_url=proxy.url, retry_deadline="30s")
        code, _, err = agent.run("fetch")
    assert code == 0, err
    assert agent.live()[1] == files
    assert err.count('"source.retry"') == 2


def test_an_unreachable_store_gives_69_within_the_deadline(agent, cloud_backend, monkeypatch):
    backend = cloud_backend
    version, before = applied(agent, backend)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    if backend.kind == "s3":
        agent.write_config(backend, endpoint_url=dead, retry_deadline="3s")
    else:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", dead)
        agent.write_config(backend, retry_deadline="3s")
    started = time.monotonic()
    refused(agent, code=69, says=["did not answer within 3s", "live stack was left in place"])
    assert time.monotonic() - started < 20
    assert agent.live() == (version, before)


@pytest.mark.parametrize("change,says", [
    ({"config.yaml": None}, "config.yaml: missing"),
    ({"config.yaml": b"SERVER_HOSTNAME: [unclosed\n"}, "is not valid YAML"),
    ({"config.yaml": b"- a\n- list\n"}, "must be a YAML mapping"),
    ({"config.yaml": yaml.safe_dump({k: v for k, v in quay_config().items()
                                     if k != "DB_URI"}).encode()}, "DB_URI: is missing"),
    ({"ssl.key": None}, "ssl.key: missing: PREFERRED_URL_SCHEME is https"),
])
def test_an_invalid_stack_is_never_applied(agent, backend, change, says):
    applied(agent, backend)
    for key, data in change.items():
        backend.delete(key) if data is None else backend.put(key, data)
    err = refused(agent, code=78, says=[says, "it was not applied"])
    assert "Traceback" not in err


def test_disk_full_while_staging_leaves_the_live_stack(agent, file_backend, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        agent.stack_dir = small / "stack"
        files = sample_stack()
        applied(agent, file_backend, files=files)
        file_backend.put("big.bin", os.urandom(200 * 1024))
        refused(agent, code=1, says=["no space left", "live stack was left in place"])
        assert agent.live()[1] == files
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_killed_mid_fetch_leaves_the_live_stack_and_the_next_run_cleans_up(agent, s3_store):
    version, before = applied(agent, s3_store)
    for i in range(300):
        s3_store.put(f"extra_ca_certs/more-{i:03d}.crt", b"x" * 512)
    with StoreProxy(s3_store.stack_options["endpoint_url"]) as proxy:
        agent.write_config(s3_store, endpoint_url=proxy.url, concurrency=1)
        proc = agent.spawn("fetch")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
                p.is_file() for s in agent.stack_dir.glob(".staging-*") for p in s.rglob("*")):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert agent.staging(), "the fetch finished before it could be killed"
    assert agent.live() == (version, before)
    agent.write_config(s3_store)
    code, out, err = agent.run("fetch")
    assert code == 0, err
    assert agent.staging() == []
    assert len(agent.live()[1]) == 321


def test_many_files_in_parallel_fetch_cleanly(agent, cloud_backend):
    files = sample_stack()
    files.update({f"extra_ca_certs/bulk-{i:03d}.crt": os.urandom(64) for i in range(80)})
    cloud_backend.upload(files)
    agent.write_config(cloud_backend, concurrency=32)
    code, out, err = agent.run("fetch")
    assert code == 0, err
    assert agent.live()[1] == files
    # e.g. urllib3's "Connection pool is full, discarding connection" when the pool is too small
    assert [line for line in err.splitlines() if '"level": "info"' not in line and
            '"secrets.weak"' not in line] == []  # the bed's S3 key "testing" is weak


def test_a_symlink_out_of_the_source_directory_is_refused(agent, file_backend, tmp_path):
    applied(agent, file_backend)
    secret = tmp_path / "outside-secret"
    secret.write_text("root only")
    (tmp_path / "source" / "leak.crt").symlink_to(secret)
    refused(agent, code=1, says=["links outside the stack directory", "leak.crt"])


# --- HTTPS with a private CA: SeaweedFS's S3 API over TLS ----------------------------------

def test_fetch_over_https_uses_the_stacks_ca_bundle(agent, seaweedfs_backend, seaweedfs_tls,
                                                    monkeypatch):
    """stack.ca_bundle is what makes the private CA trusted; an operator's AWS_CA_BUNDLE
    (here: the public CAs only) does not override it."""
    import certifi

    monkeypatch.setenv("AWS_CA_BUNDLE", certifi.where())
    files = sample_stack()
    seaweedfs_backend.upload(files)
    agent.write_config(seaweedfs_backend, endpoint_url=seaweedfs_tls["endpoint"],
                       ca_bundle=seaweedfs_tls["ca"])
    code, out, err = agent.run("fetch")
    assert code == 0, err
    assert agent.live()[1] == files


def test_fetch_over_https_without_the_ca_bundle_is_refused_on_the_certificate(
        agent, seaweedfs_backend, seaweedfs_tls, monkeypatch):
    applied(agent, seaweedfs_backend, endpoint_url=seaweedfs_tls["endpoint"],
            ca_bundle=seaweedfs_tls["ca"])
    # Nothing else may trust the private CA (the seaweedfs fixture cleared these; say it here).
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    agent.write_config(seaweedfs_backend, endpoint_url=seaweedfs_tls["endpoint"])
    refused(agent, code=1, says=["the store's TLS certificate was not accepted",
                                 "CERTIFICATE_VERIFY_FAILED", seaweedfs_backend.url,
                                 "set stack.ca_bundle to its PEM file"])
