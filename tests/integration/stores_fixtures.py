"""Fixtures for the real object stores of the test bed beside moto: SeaweedFS (S3, also over HTTPS
with the bed's private CA) and fake-gcs-server (GCS that enforces if_generation_match).

A test module that uses them says `pytest_plugins = ["tests.integration.stores_fixtures"]`.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from tests.integration.conftest import PREFIX, Backend
from tests.integration.faulty_proxy import FaultyProxy

# Variables that could make an HTTPS client trust a CA without stack.ca_bundle saying so.
CA_VARIABLES = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE",
                "SSL_CERT_DIR")


def isolate_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, keys: Dict[str, str]) -> None:
    """Only KEYS from the AWS_* world: no developer's variables, ~/.aws files or CA overrides."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name in CA_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    for name, value in keys.items():
        monkeypatch.setenv(name, value)


def seaweedfs_keys(testbed: Dict[str, Any]) -> Dict[str, str]:
    """The credentials the bed started SeaweedFS with (it refuses any other)."""
    return {"AWS_ACCESS_KEY_ID": testbed["seaweedfs_access_key"],
            "AWS_SECRET_ACCESS_KEY": testbed["seaweedfs_secret_key"],
            "AWS_DEFAULT_REGION": "us-east-1"}


def empty_and_delete(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def seaweedfs(testbed, monkeypatch, tmp_path):
    """A boto3 S3 client on the bed's SeaweedFS; the environment holds SeaweedFS's keys only."""
    from tests.testbed.bed import seaweedfs_client

    isolate_aws_env(monkeypatch, tmp_path, seaweedfs_keys(testbed))
    client = seaweedfs_client(testbed)
    yield client
    client.close()


@pytest.fixture
def seaweedfs_bucket(seaweedfs) -> Iterator[str]:
    """A new, empty bucket on SeaweedFS (3+ chars, DNS-valid); emptied and deleted afterwards."""
    name = f"qb-test-{uuid.uuid4().hex[:12]}"
    seaweedfs.create_bucket(Bucket=name)
    yield name
    empty_and_delete(seaweedfs, name)


@pytest.fixture
def seaweedfs_backend(seaweedfs, seaweedfs_bucket, testbed) -> Backend:
    """The stack source on SeaweedFS: kind "s3", like moto's, as the agent sees no difference."""

    def put(key: str, data: bytes, sha256: bool = False) -> None:
        extra = {"ChecksumAlgorithm": "SHA256"} if sha256 else {}
        seaweedfs.put_object(Bucket=seaweedfs_bucket, Key=f"{PREFIX}/{key}", Body=data, **extra)

    return Backend("s3", f"s3://{seaweedfs_bucket}/{PREFIX}", put,
                   lambda key: seaweedfs.delete_object(Bucket=seaweedfs_bucket, Key=f"{PREFIX}/{key}"),
                   {"endpoint_url": testbed["seaweedfs_endpoint"], "region": "us-east-1"},
                   seaweedfs_keys(testbed))


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_store(request) -> Backend:
    """The stack source on each S3 server: moto, and SeaweedFS (a real store)."""
    return request.getfixturevalue("s3_backend" if request.param == "moto" else "seaweedfs_backend")


@pytest.fixture
def seaweedfs_tls(testbed) -> Dict[str, str]:
    """SeaweedFS's S3 API over HTTPS: {"endpoint": https://127.0.0.1:PORT, "ca": the PEM of
    the private CA that signed its certificate}."""
    if "seaweedfs_https_endpoint" not in testbed:
        pytest.fail(f"the test bed in {testbed['dir']} predates SeaweedFS over HTTPS: restart it "
                    "(python -m tests.testbed stop/start)")
    return {"endpoint": testbed["seaweedfs_https_endpoint"], "ca": testbed["tls_ca_file"]}


@pytest.fixture
def fake_gcs(testbed, monkeypatch):
    """A google.cloud.storage.Client on the bed's fake-gcs-server (anonymous, project "test");
    STORAGE_EMULATOR_HOST points every other GCS client of the test there too."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    endpoint = testbed["fake_gcs_endpoint"]
    monkeypatch.delenv("API_ENDPOINT_OVERRIDE", raising=False)
    for name in CA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    client = storage.Client(project="test", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": endpoint})
    yield client
    client.close()


@pytest.fixture
def fake_gcs_bucket(fake_gcs) -> Iterator[str]:
    name = f"qb-test-{uuid.uuid4().hex[:12]}"
    fake_gcs.create_bucket(name)
    yield name
    fake_gcs.bucket(name).delete(force=True)


class StoreProxy(FaultyProxy):
    """FaultyProxy for any S3 server: it also forwards the client's Host as X-Forwarded-Host.

    FaultyProxy sends the upstream's own Host; moto does not check signatures, but SeaweedFS
    checks SigV4, which signs the Host the client used (the proxy's): without this it answers
    SignatureDoesNotMatch. SeaweedFS (like AWS's load balancers) verifies against
    X-Forwarded-Host when a proxy sends one; moto ignores it.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        base = self._server.RequestHandlerClass

        class Handler(base):  # type: ignore[misc, valid-type]
            def _forward(self) -> None:
                if "X-Forwarded-Host" not in self.headers:
                    self.headers["X-Forwarded-Host"] = self.headers.get("Host", "")
                base._forward(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server.RequestHandlerClass = Handler
