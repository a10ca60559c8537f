"""`quay-bootstrap publish`, `history`, `diff`, `rollback` and a node's fetch of a published
version, on moto, fake-gcs-server, SeaweedFS and a directory: what the operator sees, what the
node applies, and that a failed or lost publication leaves nothing half-done."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from quay_bootstrap.config import load_config
from quay_bootstrap.errors import SourceError
from quay_bootstrap.publish import Publisher, uploader
from quay_bootstrap.stack.plan import Limits, stack_version
from quay_bootstrap.stack.published import manifest_of, open_published, read_pointer
from tests.integration.conftest import PREFIX, Backend, free_port, wait_for
from tests.testbed.stacks import SECRETS, sample_stack

pytest_plugins = ["tests.integration.stores_fixtures"]


@pytest.fixture
def fake_gcs_backend(fake_gcs, fake_gcs_bucket, testbed) -> Backend:
    """The stack source on fake-gcs-server (which enforces if_generation_match)."""
    bucket = fake_gcs.bucket(fake_gcs_bucket)

    def put(key: str, data: bytes, **_: object) -> None:
        bucket.blob(f"{PREFIX}/{key}").upload_from_string(data)

    return Backend("gcs", f"gs://{fake_gcs_bucket}/{PREFIX}", put,
                   lambda key: bucket.blob(f"{PREFIX}/{key}").delete(),
                   env={"STORAGE_EMULATOR_HOST": testbed["fake_gcs_endpoint"]})


@pytest.fixture(params=["s3", "fake_gcs", "file", "seaweedfs"])
def store(request):
    return request.getfixturevalue(f"{request.param}_backend")


@pytest.fixture(params=["s3", "fake_gcs"])
def cloud_store(request):
    return request.getfixturevalue(f"{request.param}_backend")


def folder(tmp_path: Path, files, name: str = "stack") -> Path:
    root = tmp_path / name
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


def changed(days: int):
    """The sample stack with one setting changed (a valid stack: same hostname as its TLS)."""
    return sample_stack(TAG_EXPIRATION_OPTIONS=["2w", f"{days}d"])


def version_of(files) -> str:
    return stack_version(manifest_of(files).items())


def publish(agent, path: Path, *more: str):
    return agent.run("publish", str(path), *more)


def publisher(agent, hook=None) -> Publisher:
    """The operator's publisher in this process; HOOK(key) runs after each upload."""
    cfg = load_config(agent.config_path, lambda values: None)
    leases = open_published(cfg.stack)
    up = uploader(leases)

    def upload(key: str, data: bytes) -> None:
        up(key, data)
        if hook is not None:
            hook(key)
    return Publisher(leases, Limits(cfg.stack.max_files, cfg.stack.max_bytes), upload,
                     by="tester@laptop")


def pointer_of(agent):
    cfg = load_config(agent.config_path, lambda values: None)
    return read_pointer(open_published(cfg.stack))


def test_a_published_version_is_what_nodes_apply_and_hand_uploads_are_ignored(agent, store,
                                                                               tmp_path):
    agent.write_config(store)
    first = sample_stack()
    code, out, err = publish(agent, folder(tmp_path, first))
    assert code == 0, err
    assert f"published version {version_of(first)[:12]} as serial 1" in out
    code, _, err = agent.run("fetch")
    assert code == 0, err
    assert agent.live() == (version_of(first), first)
    # Files copied by hand under stack.source no longer decide once a version is published.
    store.upload(changed(9))
    code, _, err = agent.run("fetch")
    assert code == 0, err
    assert agent.live() == (version_of(first), first)


def test_history_diff_and_rollback(agent, store, tmp_path):
    agent.write_config(store)
    first = sample_stack()
    second = changed(2)
    assert publish(agent, folder(tmp_path, first, "one"))[0] == 0
    assert publish(agent, folder(tmp_path, second, "two"))[0] == 0
    assert agent.run("fetch")[0] == 0
    assert agent.live() == (version_of(second), second)

    code, out, err = agent.run("history")
    assert code == 0, err
    rows = out.splitlines()[1:]
    assert [r.split()[:2] for r in rows] == [["2", version_of(second)[:12]],
                                             ["1", version_of(first)[:12]]]
    assert "1 file(s) changed: ~config.yaml" in rows[0]

    code, out, err = agent.run("diff", version_of(first)[:8], version_of(second)[:8])
    assert code == 0, err
    assert "+- 2d" in out and "--- " in out
    assert not any(secret in out for secret in SECRETS.values())

    code, out, err = agent.run("rollback", version_of(first)[:10])
    assert code == 0, err
    assert f"published version {version_of(first)[:12]} as serial 3" in out
    assert agent.run("fetch")[0] == 0
    assert agent.live() == (version_of(first), first)
    assert pointer_of(agent).history[0]["version"] == version_of(second)


def test_an_invalid_stack_is_refused_and_nothing_is_uploaded(agent, store, tmp_path):
    agent.write_config(store)
    good = sample_stack()
    assert publish(agent, folder(tmp_path, good, "good"))[0] == 0
    assert agent.run("fetch")[0] == 0
    before = pointer_of(agent)
    bad = sample_stack()
    bad["config.yaml"] = yaml.safe_dump({"SERVER_HOSTNAME": "x"}).encode()  # no DB_URI, ...
    code, _, err = publish(agent, folder(tmp_path, bad, "bad"))
    assert code == 78, err
    assert "nothing was uploaded" in err and "DB_URI" in err
    assert pointer_of(agent) == before
    assert agent.run("fetch")[0] == 0 and agent.live() == (version_of(good), good)


def test_two_publishers_racing_one_wins_and_the_other_changes_nothing(agent, store, tmp_path):
    agent.write_config(store)
    assert publish(agent, folder(tmp_path, sample_stack(), "base"))[0] == 0
    theirs = changed(3)
    mine = changed(4)
    # They publish between my read of the pointer and my conditional write of it.
    slow = publisher(agent, hook=lambda key: key.startswith("versions/") and
                     publisher(agent).publish(theirs))
    with pytest.raises(SourceError) as lost:
        slow.publish(mine)
    assert "another publisher changed the pointer first" in str(lost.value)
    assert f"version {version_of(theirs)[:12]}" in str(lost.value)
    assert pointer_of(agent).version == version_of(theirs)
    assert agent.run("fetch")[0] == 0 and agent.live()[0] == version_of(theirs)


def test_a_node_refreshing_in_the_middle_of_a_publish_keeps_the_previous_version(agent, store,
                                                                                  tmp_path):
    agent.write_config(store)
    first = sample_stack()
    assert publish(agent, folder(tmp_path, first, "one"))[0] == 0
    assert agent.run("fetch")[0] == 0
    seen = []

    def node_refreshes(key: str) -> None:
        code, _, err = agent.run("fetch")
        assert code == 0, err
        seen.append((key, agent.live()[0]))

    second = changed(2)
    publisher(agent, hook=node_refreshes).publish(second)
    assert [key.split("/")[0] for key, _ in seen] == ["bundles", "versions"]
    assert {live for _, live in seen} == {version_of(first)}
    assert agent.run("fetch")[0] == 0 and agent.live() == (version_of(second), second)


def test_a_bundle_over_max_bytes_is_refused_before_anything_is_uploaded(agent, store, tmp_path):
    agent.write_config(store, max_bytes="20KiB")
    files = sample_stack()
    files["extra/blob.bin"] = bytes(range(256)) * 100  # 25,600 bytes that gzip cannot shrink
    code, _, err = publish(agent, folder(tmp_path, files))
    assert code == 1, err
    assert "stack.max_bytes" in err and "nothing was uploaded" in err
    assert pointer_of(agent) is None


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two ed25519 key pairs made by openssl, as the README says."""
    made = {}
    for name in ("ours", "other"):
        private = tmp_path_factory.mktemp("keys") / f"{name}.key"
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)],
                       check=True, capture_output=True)
        public = private.with_suffix(".pub")
        subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)],
                       check=True, capture_output=True)
        made[name] = (private, public)
    return made


def test_signed_versions_apply_and_unsigned_or_wrongly_signed_ones_keep_the_live_stack(
        agent, cloud_store, tmp_path, keys):
    store = cloud_store
    agent.write_config(store, verify_key=str(keys["ours"][1]))
    good = sample_stack()
    assert publish(agent, folder(tmp_path, good, "good"), "--sign", str(keys["ours"][0]))[0] == 0
    assert agent.run("fetch")[0] == 0 and agent.live() == (version_of(good), good)
    before = agent.live()

    unsigned = changed(5)
    assert publish(agent, folder(tmp_path, unsigned, "unsigned"))[0] == 0
    code, _, err = agent.run("fetch")
    assert code == 1 and "it is not signed and stack.verify_key requires a signature" in err
    assert agent.live() == before and agent.staging() == []

    forged = changed(6)
    assert publish(agent, folder(tmp_path, forged, "forged"), "--sign",
                   str(keys["other"][0]))[0] == 0
    code, _, err = agent.run("fetch")
    assert code == 1 and "its signature is not valid for stack.verify_key" in err
    assert agent.live() == before and agent.staging() == []


def test_a_node_with_a_verify_key_refuses_hand_uploaded_files(agent, cloud_store, keys):
    cloud_store.upload(sample_stack())
    agent.write_config(cloud_store, verify_key=str(keys["ours"][1]))
    code, _, err = agent.run("fetch")
    assert code == 1 and "nothing is published" in err and "publish --sign KEY" in err
    assert agent.live() == (None, {})


def test_history_as_json_is_the_pointer(agent, store, tmp_path):
    agent.write_config(store)
    files = sample_stack()
    assert publish(agent, folder(tmp_path, files))[0] == 0
    code, out, _ = agent.run("history", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["version"] == version_of(files) and doc["serial"] == 1
    assert doc["published_by"] and doc["manifest"] == manifest_of(files)


def test_publishing_to_a_bucket_that_does_not_exist_says_so_and_uploads_nothing(agent, cloud_store,
                                                                               tmp_path):
    """A typo in --to: the store's own answer (no such bucket), not a crash, and the stack
    published where the node's config points is untouched."""
    agent.write_config(cloud_store)
    files = sample_stack()
    assert publish(agent, folder(tmp_path, files))[0] == 0
    before = pointer_of(agent)
    scheme = cloud_store.url.split("://")[0]
    code, _, err = publish(agent, folder(tmp_path, changed(3), "other"),
                           "--to", f"{scheme}://no-such-bucket-qb/conf/stack")
    assert code == 1, err
    assert "'no-such-bucket-qb' does not exist" in err and "this is a bug" not in err
    assert "(at " in err and "Check" in err
    assert pointer_of(agent) == before
    assert agent.run("fetch")[0] == 0 and agent.live() == (version_of(files), files)


def test_a_publisher_who_may_only_read_is_told_and_nothing_changes(agent, s3_backend, tmp_path,
                                                                   monkeypatch):
    """A second moto that enforces IAM: a user allowed s3:GetObject and s3:ListBucket only."""
    import boto3

    moto = os.path.join(os.path.dirname(sys.executable), "moto_server")
    port = free_port()
    # The first four requests (the user, its policy, its key, the bucket) are not checked.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_for(lambda: _answers(port), 15, "the IAM-enforcing moto")
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing")
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Resource": "*",
                                                    "Action": ["s3:GetObject", "s3:ListBucket"]}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="guarded")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        agent.write_config(s3_backend, source="s3://guarded/conf/stack", endpoint_url=endpoint)
        code, _, err = publish(agent, folder(tmp_path, sample_stack()))
        assert code == 1, err
        assert "no permission to write under s3://guarded/conf/stack.published; nothing nodes " \
            "see changed" in err
        assert "(at s3://guarded/conf/stack.published/bundles/" in err and "s3:PutObject" in err
        assert pointer_of(agent) is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_an_older_signed_pointer_put_back_is_refused(agent, cloud_store, tmp_path, keys):
    """Someone who may write the bucket but not sign restores an earlier signed pointer."""
    agent.write_config(cloud_store, verify_key=str(keys["ours"][1]))
    sign = ("--sign", str(keys["ours"][0]))
    first, second = sample_stack(), changed(7)
    assert publish(agent, folder(tmp_path, first, "one"), *sign)[0] == 0
    cfg = load_config(agent.config_path, lambda values: None)
    leases = open_published(cfg.stack)
    old_pointer = leases.get("pointer")[0]
    assert agent.run("fetch")[0] == 0
    assert publish(agent, folder(tmp_path, second, "two"), *sign)[0] == 0
    assert agent.run("fetch")[0] == 0 and agent.live() == (version_of(second), second)
    got = leases.get("pointer")
    assert leases.replace("pointer", old_pointer, got[1])  # the replay
    code, _, err = agent.run("fetch")
    assert code == 1 and "refusing serial 1" in err and "older signed pointer" in err
    assert agent.live() == (version_of(second), second)


def test_a_damaged_pointer_is_refused_by_nodes_and_replaced_by_the_next_publish(agent, store,
                                                                             tmp_path):
    agent.write_config(store)
    files = sample_stack()
    assert publish(agent, folder(tmp_path, files, "one"))[0] == 0
    assert agent.run("fetch")[0] == 0
    cfg = load_config(agent.config_path, lambda values: None)
    leases = open_published(cfg.stack)
    assert leases.replace("pointer", b"{not json", leases.get("pointer")[1])
    code, _, err = agent.run("fetch")
    assert code == 1 and "the published pointer is not valid" in err
    assert agent.live() == (version_of(files), files)
    second = changed(8)
    code, out, err = publish(agent, folder(tmp_path, second, "two"))
    assert code == 0 and "as serial 1" in out, err
    assert agent.run("fetch")[0] == 0 and agent.live() == (version_of(second), second)
