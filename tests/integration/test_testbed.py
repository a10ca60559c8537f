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
