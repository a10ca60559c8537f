"""The tag lock, from a table: what may run, what is refused before anything is pulled."""
from __future__ import annotations

import pytest

from quay_bootstrap.config import DEFAULT_ALLOWED_TAGS
from quay_bootstrap.errors import EXIT_LOCK, LockViolation
from quay_bootstrap.lock import check_policy, parse_reference, resolve

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text,repo,tag,digest,registry", [
    ("quay.io/projectquay/quay:v3.9.0", "quay.io/projectquay/quay", "v3.9.0", None, "quay.io"),
    (f"quay.io/projectquay/quay:v3.9.0@{DIGEST}", "quay.io/projectquay/quay", "v3.9.0", DIGEST,
     "quay.io"),
    ("127.0.0.1:5000/quay/quay:3.9.1", "127.0.0.1:5000/quay/quay", "3.9.1", None,
     "127.0.0.1:5000"),
    ("registry.redhat.io/quay/quay-rhel9:v3.16.0", "registry.redhat.io/quay/quay-rhel9",
     "v3.16.0", None, "registry.redhat.io"),
    ("library/quay", "library/quay", None, None, "docker.io"),
    ("localhost:5000/q", "localhost:5000/q", None, None, "localhost:5000"),
])
def test_parse(text, repo, tag, digest, registry):
    ref = parse_reference(text)
    assert (ref.repository, ref.tag, ref.digest, ref.registry) == (repo, tag, digest, registry)
    assert str(ref) == text


@pytest.mark.parametrize("tag", ["v3.9.0", "3.9.0", "v3.9.0-rc1", "v3.15.2-1", "v10.0.0"])
def test_fixed_release_tags_pass(tag):
    check_policy(parse_reference(f"quay.io/projectquay/quay:{tag}"), DEFAULT_ALLOWED_TAGS)


@pytest.mark.parametrize("text,says", [
    ("quay.io/projectquay/quay", "has no tag"),
    ("quay.io/projectquay/quay:latest", "'latest'"),
    ("quay.io/projectquay/quay:v3", "'v3'"),
    ("quay.io/projectquay/quay:3.9", "'3.9'"),
    ("quay.io/projectquay/quay:3.9-unstable", "'3.9-unstable'"),
    ("quay.io/projectquay/quay:nightly", "'nightly'"),
])
def test_floating_tags_are_refused_with_what_to_write(text, says):
    with pytest.raises(LockViolation) as caught:
        check_policy(parse_reference(text), DEFAULT_ALLOWED_TAGS)
    assert caught.value.exit_code == EXIT_LOCK
    assert says in str(caught.value)
    assert "quay.io/projectquay/quay:v3.9.0" in caught.value.hint


@pytest.mark.parametrize("text", ["Quay.IO/x:v1.0.0", "quay:v1.0.0@sha256:short", ":v1.0.0", ""])
def test_not_references(text):
    with pytest.raises(LockViolation):
        parse_reference(text)


LOCAL = "quay.io/projectquay/quay:v3.9.0"


def test_no_lock_uses_the_local_reference():
    assert str(resolve(LOCAL, DEFAULT_ALLOWED_TAGS).ref) == LOCAL
    assert not resolve(LOCAL, DEFAULT_ALLOWED_TAGS).overridden


def test_the_cluster_lock_wins_and_says_so():
    got = resolve(LOCAL, DEFAULT_ALLOWED_TAGS,
                  f"reference: quay.io/projectquay/quay:v3.10.1\ndigest: {DIGEST}\n".encode(),
                  "s3://b/quay-lock.yaml")
    assert str(got.ref) == f"quay.io/projectquay/quay:v3.10.1@{DIGEST}" and got.overridden
    same = resolve(LOCAL, DEFAULT_ALLOWED_TAGS, f"reference: {LOCAL}\n".encode())
    assert not same.overridden


@pytest.mark.parametrize("text,says", [
    (b"reference: quay.io/projectquay/quay:latest\n", "'latest'"),
    (b"reference: [\n", "not valid YAML"),
    (b"- quay.io/projectquay/quay:v3.9.0\n", "must be a mapping"),
    (b"reference: quay.io/projectquay/quay:v3.9.0\ntag: x\n", "nothing else"),
    (b"reference: quay.io/projectquay/quay:v3.9.0\ndigest: md5:abc\n", "is not sha256"),
    (f"reference: quay.io/projectquay/quay:v3.9.0@{DIGEST}\ndigest: sha256:{'cd' * 32}\n"
     .encode(), "different images"),
])
def test_a_bad_lock_is_refused(text, says):
    with pytest.raises(LockViolation, match=says) as caught:
        resolve(LOCAL, DEFAULT_ALLOWED_TAGS, text, "s3://b/quay-lock.yaml")
    assert caught.value.exit_code == EXIT_LOCK


def test_a_bad_local_reference_is_refused_even_with_a_good_lock():
    with pytest.raises(LockViolation, match="'latest'"):
        resolve("quay.io/projectquay/quay:latest", DEFAULT_ALLOWED_TAGS,
                b"reference: quay.io/projectquay/quay:v3.9.0\n")


def test_the_cluster_lock_may_not_move_the_image_to_another_registry():
    with pytest.raises(LockViolation) as caught:
        resolve("quay.io/projectquay/quay:v3.9.0", DEFAULT_ALLOWED_TAGS,
                b"reference: attacker.example.net/x/quay:v3.9.0\n", "s3://b/quay-lock.yaml")
    assert caught.value.exit_code == EXIT_LOCK
    assert "attacker.example.net/x/quay" in str(caught.value)
    assert "quay.io/projectquay/quay" in str(caught.value)


@pytest.mark.parametrize("allowed, tag, ok", [
    (r"v3\.9", "v3.9.0", False),  # a full match, not a search
    (r"v3\.9\.\d+", "v3.9.1", True),
    (r"v3\.9.*", "v3.9", False),  # a floating tag is never a lock, whatever the pattern says
    (r".*", "3", False),
])
def test_allowed_tags_are_full_matches_and_never_admit_a_floating_tag(allowed, tag, ok):
    ref = parse_reference(f"quay.io/projectquay/quay:{tag}")
    if ok:
        assert check_policy(ref, allowed) == ref
    else:
        with pytest.raises(LockViolation):
            check_policy(ref, allowed)


def test_a_lock_client_is_not_shared_by_configs_with_different_ca_bundles(monkeypatch):
    # The lock's client is cached across passes (pipeline.resolve_image): a config naming
    # another CA bundle must get a client that verifies with it, not the one opened before.
    from quay_bootstrap import pipeline
    from quay_bootstrap.config import parse_config

    class Lock:
        def get(self, key):
            return b"reference: quay.io/projectquay/quay:v3.9.0\n"

    opened = []

    def open_object(url, stack):
        opened.append(stack.ca_bundle)
        return Lock(), "quay-lock.yaml"

    monkeypatch.setattr(pipeline, "open_object", open_object)
    cache: dict = {}
    for bundle in ("/etc/pki/a.pem", "/etc/pki/b.pem", "/etc/pki/a.pem"):
        cfg = parse_config(f"stack: {{source: 's3://cfg/stack', ca_bundle: '{bundle}'}}\n"
                           "image: {reference: 'quay.io/projectquay/quay:v3.9.0', "
                           "lock: 's3://cfg/quay-lock.yaml'}\n")
        pipeline.resolve_image(cfg, cache=cache)
    assert [str(b) for b in opened] == ["/etc/pki/a.pem", "/etc/pki/b.pem"]
