"""setup.cfg's lower bounds have what the agent calls: checked in those versions' own files,
downloaded from the package index (the version below botocore's bound must lack it)."""
from __future__ import annotations

import ast
import configparser
import gzip
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def lower_bound(name: str) -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    for line in config["options"]["install_requires"].splitlines():
        found = re.fullmatch(rf"\s*{re.escape(name)}>=([\d.]+).*", line)
        if found:
            return found.group(1)
    raise AssertionError(f"setup.cfg has no lower bound for {name}")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wheels")

    def get(name: str, version: str) -> zipfile.ZipFile:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary", ":all:", f"{name}=={version}", "-d", str(folder)],
                       check=True, capture_output=True, timeout=300)
        stem = name.replace("-", "_")
        return zipfile.ZipFile(next(folder.glob(f"{stem}-{version}-*.whl")))

    return get


def s3_request_members(wheel: zipfile.ZipFile, operation: str) -> set:
    name = next(n for n in wheel.namelist() if "data/s3/2006-03-01/service-2.json" in n)
    data = wheel.read(name)
    model = json.loads(gzip.decompress(data) if name.endswith(".gz") else data)
    return set(model["shapes"][f"{operation}Request"]["members"])


def keyword_args(wheel: zipfile.ZipFile, module: str, cls: str, method: str) -> set:
    tree = ast.parse(wheel.read(module))
    klass = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    func = next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == method)
    return {a.arg for a in func.args.args + func.args.kwonlyargs}


def test_botocores_bound_is_the_first_with_conditional_puts(wheels):
    bound = lower_bound("botocore")
    assert lower_bound("boto3") == bound  # boto3 x.y.z requires botocore >= x.y.z
    at_bound = wheels("botocore", bound)
    assert {"IfNoneMatch", "IfMatch"} <= s3_request_members(at_bound, "PutObject")
    assert {"IfMatch", "ChecksumMode"} <= s3_request_members(at_bound, "GetObject")
    major, minor, patch = (int(part) for part in bound.split("."))
    below = wheels("botocore", f"{major}.{minor}.{patch - 1}")
    assert "IfMatch" not in s3_request_members(below, "PutObject")


def test_google_cloud_storages_bound_has_generation_preconditions(wheels):
    """The keywords stores/gcs.py passes, in each method it calls."""
    wheel = wheels("google-cloud-storage", lower_bound("google-cloud-storage"))
    blob, bucket = "google/cloud/storage/blob.py", "google/cloud/storage/bucket.py"
    client = "google/cloud/storage/client.py"
    assert {"if_generation_match", "timeout", "retry"} <= keyword_args(
        wheel, blob, "Blob", "upload_from_string")
    assert {"checksum", "timeout", "retry"} <= keyword_args(wheel, blob, "Blob", "download_to_file")
    assert {"timeout", "retry"} <= keyword_args(wheel, blob, "Blob", "delete")
    assert {"prefix", "timeout", "retry"} <= keyword_args(wheel, client, "Client", "list_blobs")
    assert "generation" in keyword_args(wheel, bucket, "Bucket", "blob")
