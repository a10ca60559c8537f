"""Fixtures for the real services of the test bed (tests/testbed); each starts it only on demand.

Uses the bed named by TESTBED_DIR when that one is running, else starts one for the session
and stops it at the end. A bed that cannot start fails the tests that need it: never a skip.
"""

from __future__ import annotations

import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.testbed import bed, fake_quay


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The bed's testbed.json as a dict (keys: docker_host, registry, moto_endpoint, ...)."""
    given = os.environ.get("TESTBED_DIR")
    if given and bed.is_running(given):
        yield bed.load(given)
        return
    directory = tmp_path_factory.mktemp("testbed")
    try:
        yield bed.start(directory)  # start() stops what it began if it fails
    finally:
        bed.stop(directory)


@pytest.fixture(scope="session")
def moto_endpoint(testbed: dict[str, Any]) -> str:
    return testbed["moto_endpoint"]


@pytest.fixture(scope="session")
def gcs_endpoint(testbed: dict[str, Any]) -> str:
    return testbed["gcs_endpoint"]


@pytest.fixture(scope="session")
def registry(testbed: dict[str, Any]) -> str:
    """host:port of the bed's registry without auth."""
    return testbed["registry"]


@pytest.fixture(scope="session")
def auth_registry(testbed: dict[str, Any]) -> dict[str, str]:
    """The registry that wants basic auth: {"registry": host:port, "username", "password"}."""
    return {
        "registry": testbed["auth_registry"],
        "username": testbed["auth_registry_user"],
        "password": Path(testbed["auth_registry_password_file"]).read_text().strip(),
    }


@pytest.fixture(scope="session")
def docker_client(testbed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory):
    """A docker.DockerClient on the bed's private dockerd; never reads ~/.docker/config.json."""
    import docker

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOCKER_CONFIG", str(tmp_path_factory.mktemp("docker-config")))
        client = docker.DockerClient(base_url=testbed["docker_host"], version="auto")
        yield client
        client.close()


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A boto3 S3 client on moto, whose state is reset first."""
    import boto3
    from botocore.config import Config

    # Keep the developer's ~/.aws files and AWS_* variables out of the test.
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-absent"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-absent"))
    urllib.request.urlopen(
        urllib.request.Request(f"{moto_endpoint}/moto-api/reset", method="POST"), timeout=10
    )
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(s3={"addressing_style": "path"}),
    )
    yield client
    client.close()


@pytest.fixture
def s3_bucket(s3) -> Iterator[str]:
    """The name of a new, empty bucket on moto; emptied and deleted afterwards."""
    name = f"qb-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
        for item in page.get("Versions", []) + page.get("DeleteMarkers", []):
            s3.delete_object(Bucket=name, Key=item["Key"], VersionId=item["VersionId"])
    s3.delete_bucket(Bucket=name)


@pytest.fixture
def gcs_client(gcs_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A google.cloud.storage.Client on the emulator, anonymous, project "test"."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    # client_options' api_endpoint wins over STORAGE_EMULATOR_HOST; clear both env overrides
    # so a leftover variable cannot send a test elsewhere.
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("API_ENDPOINT_OVERRIDE", raising=False)
    client = storage.Client(
        project="test",
        credentials=AnonymousCredentials(),
        client_options={"api_endpoint": gcs_endpoint},
    )
    yield client
    client.close()


@pytest.fixture
def gcs_bucket(gcs_client) -> Iterator[str]:
    """The name of a new bucket on the emulator; deleted with its blobs afterwards."""
    name = f"qb-test-{uuid.uuid4().hex[:12]}"
    gcs_client.create_bucket(name)
    yield name
    gcs_client.bucket(name).delete(force=True)


@pytest.fixture(scope="session")
def fake_images(docker_client, registry):
    """The fake Quay (tests/testbed/fake_quay.py), v3.9.0 and v3.9.1, in the bed's registry:
    {tag: reference}."""
    return {tag: fake_quay.build(docker_client, registry, tag) for tag in ("v3.9.0", "v3.9.1")}
