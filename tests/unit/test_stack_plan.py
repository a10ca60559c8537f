"""Pure decisions on a listing: unsafe keys, limits, reuse of unchanged objects, checksums, version ids."""
import hashlib

import pytest

from quay_bootstrap.errors import SourceError
from quay_bootstrap.stack.plan import (
    Limits,
    ManifestEntry,
    checksum_mismatch,
    plan_fetch,
    prune,
    stack_version,
    unsafe_key_reason,
)
from quay_bootstrap.stores import ObjectInfo

LIMITS = Limits(max_files=10, max_bytes=1000)
URL = "s3://bucket/conf/stack"


@pytest.mark.parametrize("key,why", [
    ("../etc/passwd", "'..'"),
    ("a/../../b", "'..'"),
    ("./config.yaml", "'.'"),
    ("/etc/shadow", "absolute"),
    ("a\\b", "backslash"),
    ("a\0b", "NUL or control"),
    ("a\nb", "NUL or control"),
    ("a\x7fb", "NUL or control"),
    ("a//b", "empty path component"),
    ("", "empty"),
    ("x" * 256, "longer than 255"),
])
def test_unsafe_keys(key, why):
    assert why in unsafe_key_reason(key)


@pytest.mark.parametrize("key", ["config.yaml", "extra_ca_certs/ca.crt", "a/b/c.pem", "..hidden",
                                 "ssl.key", "dir.with.dots/x", "ünïcode.txt"])
def test_safe_keys(key):
    assert unsafe_key_reason(key) is None


def objs(*specs):
    return [ObjectInfo(key=k, size=s, token=t) for k, s, t in specs]


def test_one_unsafe_key_refuses_the_whole_stack_naming_it():
    with pytest.raises(SourceError) as caught:
        plan_fetch(URL, objs(("config.yaml", 1, "a"), ("../x", 1, "b")), LIMITS)
    assert "'../x'" in str(caught.value) and URL in str(caught.value)


def test_empty_prefix_names_the_url():
    with pytest.raises(SourceError, match="no objects found") as caught:
        plan_fetch(URL, [], LIMITS)
    assert caught.value.where == URL


@pytest.mark.parametrize("specs,what", [
    ([(f"f{i}", 1, "t") for i in range(11)], "11 files, more than stack.max_files (10)"),
    ([("a", 600, "t"), ("b", 401, "t")], "1001 bytes, more than stack.max_bytes (1000)"),
    ([("a", 1, "t"), ("a/b", 1, "t")], "both a file and a folder"),
])
def test_limits_and_conflicts(specs, what):
    with pytest.raises(SourceError, match=what.replace("(", r"\(").replace(")", r"\)")):
        plan_fetch(URL, objs(*specs), LIMITS)


def test_unchanged_objects_are_reused_not_downloaded():
    current = {"a": ManifestEntry(1, "t1", "s"), "b": ManifestEntry(2, "t2", "s")}
    plan = plan_fetch(URL, objs(("a", 1, "t1"), ("b", 2, "t2")), LIMITS, current)
    assert plan.unchanged and not plan.download and len(plan.reuse) == 2

    plan = plan_fetch(URL, objs(("a", 1, "t1"), ("b", 2, "NEW")), LIMITS, current)
    assert not plan.unchanged and [o.key for o in plan.download] == ["b"]

    # An object deleted from the store is a change even though nothing is downloaded.
    plan = plan_fetch(URL, objs(("a", 1, "t1")), LIMITS, current)
    assert not plan.unchanged and not plan.download


def test_checksums():
    data = b"hello"
    md5 = hashlib.md5(data).hexdigest()
    sha = hashlib.sha256(data).hexdigest()
    obj = ObjectInfo("k", 5, "t", {"md5": md5})
    assert checksum_mismatch(data, obj, {}) == (None, "md5")
    assert checksum_mismatch(data, obj, {"sha256": sha}) == (None, "sha256")
    assert "sha256" in checksum_mismatch(data, obj, {"sha256": "0" * 64})[0]
    assert "truncated" in checksum_mismatch(b"hell", obj, {})[0]
    assert "md5" in checksum_mismatch(b"jello", obj, {})[0]
    # SSE-KMS: the store withdraws the ETag as an MD5.
    assert checksum_mismatch(b"jello", obj, {"md5": ""}) == (None, "size only")
    crc = ObjectInfo("k", 5, "t", {"crc32c": "9a71bb4c"})  # crc32c("hello")
    assert checksum_mismatch(data, crc, {}) == (None, "crc32c")


def test_version_id_depends_on_paths_and_content_not_order():
    a = stack_version([("a", "1"), ("b", "2")])
    assert a == stack_version([("b", "2"), ("a", "1")])
    assert a != stack_version([("a", "1"), ("b", "3")])
    assert a != stack_version([("a", "1"), ("c", "2")])
    assert len(a) == 64


def test_prune_keeps_newest_and_protected():
    versions = [("v1", 1), ("v2", 2), ("v3", 3), ("v4", 4), ("v5", 5)]
    assert prune(versions, 3, []) == ["v1", "v2"]
    assert prune(versions, 3, ["v1"]) == ["v2"]
    assert prune(versions, 1, ["v2", "v3"]) == ["v1", "v4"]
