"""Stack sources on the real stores (moto S3 over HTTP, the GCS emulator, a directory) and a way
to run the agent's CLI against them and look at what is live on disk."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import pytest
import yaml

from quay_bootstrap.cli import main

PREFIX = "conf/stack"


@dataclass
class Backend:
    """A stack source on one kind of store, and the agent config that reads it."""

    kind: str
    url: str
    put: Callable[..., None]
    delete: Callable[[str], None]
    stack_options: Dict[str, object] = field(default_factory=dict)
    env: Dict[str, str] = field(default_factory=dict)

    def upload(self, files: Dict[str, bytes]) -> None:
        for key, data in files.items():
            self.put(key, data)


@pytest.fixture
def s3_backend(s3, s3_bucket, moto_endpoint, monkeypatch) -> Backend:
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def put(key: str, data: bytes, sha256: bool = False) -> None:
        extra = {"ChecksumAlgorithm": "SHA256"} if sha256 else {}
        s3.put_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}", Body=data, **extra)

    return Backend("s3", f"s3://{s3_bucket}/{PREFIX}", put,
                   lambda key: s3.delete_object(Bucket=s3_bucket, Key=f"{PREFIX}/{key}"),
                   {"endpoint_url": moto_endpoint, "region": "us-east-1"}, env)


@pytest.fixture
def gcs_backend(gcs_client, gcs_bucket, gcs_endpoint, monkeypatch) -> Backend:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_endpoint)
    bucket = gcs_client.bucket(gcs_bucket)

    def put(key: str, data: bytes, **_: object) -> None:
        bucket.blob(f"{PREFIX}/{key}").upload_from_string(data)

    return Backend("gcs", f"gs://{gcs_bucket}/{PREFIX}", put,
                   lambda key: bucket.blob(f"{PREFIX}/{key}").delete(),
                   env={"STORAGE_EMULATOR_HOST": gcs_endpoint})


@pytest.fixture
def file_backend(tmp_path) -> Backend:
    root = tmp_path / "source"
    root.mkdir()

    def put(key: str, data: bytes, **_: object) -> None:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return Backend("file", f"file://{root}", put, lambda key: (root / key).unlink())


@pytest.fixture(params=["s3", "gcs", "file"])
def backend(request) -> Backend:
    """The same behaviour on every kind of store."""
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(params=["s3", "gcs"])
def cloud_backend(request) -> Backend:
    """The same behaviour on every object store (not a directory)."""
    return request.getfixturevalue(f"{request.param}_backend")


@dataclass
class Agent:
    """Writes the agent config and runs `quay-bootstrap` against it."""

    config_path: Path
    stack_dir: Path
    capsys: pytest.CaptureFixture
    env: Dict[str, str]

    def write_config(self, backend: Backend, **stack: object) -> None:
        options = {"source": backend.url, "dir": str(self.stack_dir), "retry_deadline": "5s",
                   **backend.stack_options, **stack}
        config = {"stack": options, "image": {"reference": "quay.io/projectquay/quay:v3.9.0"}}
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = dict(backend.env)

    def run(self, *args: str) -> Tuple[int, str, str]:
        """The CLI in this process: fast, and what it prints is captured."""
        self.capsys.readouterr()
        code = main(["--config", str(self.config_path), *args, "--log-format", "json"])
        out, err = self.capsys.readouterr()
        return code, out, err

    def spawn(self, *args: str, log_level: str = "info",
              log_format: str = "json") -> subprocess.Popen:
        """The CLI as its own process, as systemd runs it."""
        env = {**os.environ, **self.env}
        return subprocess.Popen(
            [sys.executable, "-m", "quay_bootstrap", "--config", str(self.config_path), *args,
             "--log-level", log_level, "--log-format", log_format],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)

    def live(self) -> Tuple[Optional[str], Dict[str, bytes]]:
        """The version `current` points at and every file in it."""
        current = self.stack_dir / "current"
        if not current.is_symlink():
            return None, {}
        folder = current.resolve()
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in folder.rglob("*") if p.is_file()}
        return folder.name, files

    def staging(self) -> list:
        return sorted(p.name for p in self.stack_dir.glob(".staging-*"))


@pytest.fixture
def agent(tmp_path, capsys) -> Agent:
    return Agent(tmp_path / "agent.yaml", tmp_path / "stack", capsys, {})
