"""The test bed's services answer over their real protocols."""

from __future__ import annotations

import base64
import hashlib
import socket
import time
import urllib.error
import urllib.request
import uuid

import docker
import google_crc32c
import pytest

from tests.testbed.bed import import_busybox_image, push_image


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, deadline: float = 5.0) -> bytes:
    """GET URL, retrying while the server is still coming up."""
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.read()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_moto_s3_stores_and_returns_sha256(s3, s3_bucket):
    body = b"FEATURE_X: true\n"
    s3.put_object(Bucket=s3_bucket, Key="stack/config.yaml", Body=body, ChecksumAlgorithm="SHA256")

    got = s3.get_object(Bucket=s3_bucket, Key="stack/config.yaml", ChecksumMode="ENABLED")

    assert got["Body"].read() == body
    assert got["ChecksumSHA256"] == _b64(hashlib.sha256(body).digest())
    assert got["ETag"].strip('"') == hashlib.md5(body).hexdigest()


def test_gcs_emulator_returns_md5_and_crc32c(gcs_client, gcs_bucket):
    body = b"DB_URI: postgresql://quay@db/quay\n"
    gcs_client.bucket(gcs_bucket).blob("stack/config.yaml").upload_from_string(body)

    blob = gcs_client.bucket(gcs_bucket).get_blob("stack/config.yaml")

    assert blob.download_as_bytes() == body
    assert blob.md5_hash == _b64(hashlib.md5(body).digest())
    assert blob.crc32c == _b64(google_crc32c.value(body).to_bytes(4, "big"))


def test_private_dockerd_answers(docker_client, testbed):
    assert docker_client.ping() is True
    assert testbed["docker_host"].startswith("unix://")
    assert docker_client.version()["ApiVersion"]


def test_busybox_image_pushed_pulled_and_serving_on_loopback(docker_client, registry):
    repository = f"{registry}/qb-test/busybox-{uuid.uuid4().hex[:8]}"
    port = _free_port()
    health = '#!/bin/sh\nprintf "Content-Type: application/json\\r\\n\\r\\n"\necho \'{"ok": 1}\'\n'
    files = {"/www/hello.txt": "hello from busybox\n", "/www/cgi-bin/health": health}
    image_id = import_busybox_image(
        docker_client,
        repository,
        "1",
        files,
        ["httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"],
    )
    container = None
    try:
        digest = push_image(docker_client, repository, "1")
        assert digest and digest.startswith("sha256:")
        docker_client.images.remove(image_id, force=True)

        pulled = docker_client.images.pull(repository, tag="1")
        assert pulled.id == image_id
        # SIGKILL: busybox httpd as PID 1 ignores SIGTERM.
        container = docker_client.containers.run(
            pulled.id, network_mode="host", detach=True, stop_signal="SIGKILL"
        )

        assert _get(f"http://127.0.0.1:{port}/hello.txt") == b"hello from busybox\n"
        assert b'{"ok": 1}' in _get(f"http://127.0.0.1:{port}/cgi-bin/health")
    finally:
        if container is not None:
            container.remove(force=True)
        try:
            docker_client.images.remove(f"{repository}:1", force=True)
        except docker.errors.ImageNotFound:
            pass
    name = repository.split("/", 1)[1]
    request = urllib.request.Request(
        f"http://{registry}/v2/{name}/manifests/{digest}", method="DELETE"
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        assert resp.status == 202


def test_auth_registry_wants_the_right_password(testbed, auth_registry, docker_client):
    # A client of its own, so the login does not stick to the session's docker_client (which
    # is still requested: it points DOCKER_CONFIG at an empty directory).
    client = docker.DockerClient(base_url=testbed["docker_host"], version="auto")
    try:
        with pytest.raises(docker.errors.APIError) as err:
            client.login(
                auth_registry["username"], "wrong", registry=auth_registry["registry"], reauth=True
            )
        # dockerd reports the registry's 401 as a 500 of its own.
        assert "401" in str(err.value) or "unauthorized" in str(err.value).lower()

        answer = client.login(
            auth_registry["username"],
            auth_registry["password"],
            registry=auth_registry["registry"],
            reauth=True,
        )
        assert answer["Status"] == "Login Succeeded"
    finally:
        client.close()


def test_seaweedfs_enforces_conditional_writes(testbed):
    from botocore.exceptions import ClientError

    from tests.testbed.bed import seaweedfs_client

    s3 = seaweedfs_client(testbed)
    bucket = f"qb-test-{uuid.uuid4().hex[:12]}"
    try:
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="lease", Body=b"first", IfNoneMatch="*")
        with pytest.raises(ClientError) as err:
            s3.put_object(Bucket=bucket, Key="lease", Body=b"second", IfNoneMatch="*")
        assert err.value.response["Error"]["Code"] == "PreconditionFailed"
        assert s3.get_object(Bucket=bucket, Key="lease")["Body"].read() == b"first"
    finally:
        for item in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)
        s3.close()


def test_fake_gcs_server_enforces_if_generation_match(testbed):
    from google.api_core.exceptions import PreconditionFailed
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": testbed["fake_gcs_endpoint"]})
    bucket = client.create_bucket(f"qb-test-{uuid.uuid4().hex[:12]}")
    try:
        bucket.blob("lease").upload_from_string(b"first", if_generation_match=0)
        with pytest.raises(PreconditionFailed):
            bucket.blob("lease").upload_from_string(b"second", if_generation_match=0)
        assert bucket.blob("lease").download_as_bytes() == b"first"
    finally:
        bucket.delete(force=True)
        client.close()


def test_redis_can_be_made_down_hung_and_slow(testbed):
    from tests.testbed import faults

    def ping(port, timeout=1.0):
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16)

    port = testbed["redis_port"]
    assert ping(port) == b"+PONG\r\n"
    with faults.hung(testbed["dir"], "redis"):
        with pytest.raises(TimeoutError):
            ping(port, timeout=0.5)
    with faults.down(testbed["dir"], "redis"):
        with pytest.raises(ConnectionRefusedError):
            ping(port)
    assert ping(port) == b"+PONG\r\n"  # started again on the same port
    with faults.SlowProxy(("127.0.0.1", port), delay=0.5) as proxy:
        began = time.monotonic()
        assert ping(proxy.port, timeout=3) == b"+PONG\r\n"
        assert time.monotonic() - began >= 0.5


def test_seaweedfs_and_fake_gcs_come_back_after_an_outage(testbed):
    from tests.testbed import faults
    from tests.testbed.bed import seaweedfs_client

    gcs_buckets = f"{testbed['fake_gcs_endpoint']}/storage/v1/b"
    for name, url in (("seaweedfs", testbed["seaweedfs_endpoint"] + "/"), ("fake_gcs", gcs_buckets)):
        with faults.down(testbed["dir"], name):
            with pytest.raises(urllib.error.URLError):
                urllib.request.urlopen(url, timeout=2)
    s3 = seaweedfs_client(testbed)
    try:
        assert "Buckets" in s3.list_buckets()  # same port, same keys after the restart
    finally:
        s3.close()
    assert _get(gcs_buckets)
