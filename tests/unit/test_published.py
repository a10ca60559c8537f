"""Published stacks, the pure part: bundles, pointers, signatures, history and diffs."""
from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import replace

import pytest

from quay_bootstrap.errors import ConfigError, SourceError
from quay_bootstrap.publish import MASK, diff_lines, history_lines
from quay_bootstrap.stack import published as pub
from quay_bootstrap.stack.plan import Limits

FILES = {"config.yaml": b"SERVER_HOSTNAME: quay.example.com\nDB_URI: postgresql://q:s3cret@db/q\n",
         "extra_ca_certs/ca.crt": b"-----BEGIN CERTIFICATE-----\n",
         "ssl.key": b"-----BEGIN PRIVATE KEY-----\nabc\n"}
LIMITS = Limits(100, 1 << 20)
WHERE = "s3://b/conf/stack.published/pointer"


def pointer_for(files, previous=None, who="ops@laptop", when="2026-12-05T01:00:00Z"):
    return pub.next_pointer(previous, pub.manifest_of(files), pub.make_bundle(files), who, when)


def raw_bundle(entries) -> bytes:
    """A tar.gz made by hand: (TarInfo, data) pairs."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return gzip.compress(raw.getvalue())


def test_the_same_files_make_the_same_bundle_and_it_opens_to_them():
    bundle = pub.make_bundle(FILES)
    assert bundle == pub.make_bundle(dict(reversed(list(FILES.items()))))
    pointer = pointer_for(FILES)
    assert pub.open_bundle(bundle, pointer, LIMITS, WHERE) == FILES


def test_a_bundle_other_than_the_pointer_names_is_refused():
    pointer = pointer_for(FILES)
    other = pub.make_bundle({**FILES, "config.yaml": b"x: 1\n"})
    with pytest.raises(SourceError, match="not the one the pointer names"):
        pub.open_bundle(other, pointer, LIMITS, WHERE)


def bundle_pointer(data: bytes, manifest) -> pub.Pointer:
    """A pointer naming a hand-made bundle (its hash and size right, so its contents are judged)."""
    import hashlib

    return pub.Pointer(1, pub.stack_version(manifest.items()), hashlib.sha256(data).hexdigest(),
                       len(data), dict(manifest), "x", "y")


@pytest.mark.parametrize("name,kind,why", [
    ("../escape", tarfile.REGTYPE, "'..'"),
    ("/etc/passwd", tarfile.REGTYPE, "absolute"),
    ("link", tarfile.SYMTYPE, "not a regular file"),
    ("dev", tarfile.CHRTYPE, "not a regular file"),
])
def test_unsafe_entries_are_refused(name, kind, why):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/shadow" if kind == tarfile.SYMTYPE else ""
    data = raw_bundle([(info, None)])
    with pytest.raises(SourceError, match=why):
        pub.open_bundle(data, bundle_pointer(data, {"config.yaml": "0" * 64}), LIMITS, WHERE)


def test_a_decompression_bomb_stops_at_max_bytes():
    huge = b"\0" * (4 << 20)  # 4 MiB of zeros: a few KiB compressed
    data = pub.make_bundle({"config.yaml": huge})
    assert len(data) < 16 << 10
    with pytest.raises(SourceError, match="stack.max_bytes"):
        pub.open_bundle(data, bundle_pointer(data, pub.manifest_of({"config.yaml": huge})),
                        Limits(100, 1 << 20), WHERE)


def test_files_the_manifest_does_not_list_are_refused():
    data = pub.make_bundle({**FILES, "planted.yaml": b"x"})
    with pytest.raises(SourceError, match="do not match its manifest"):
        pub.open_bundle(data, bundle_pointer(data, pub.manifest_of(FILES)), LIMITS, WHERE)


def test_a_pointer_reads_back_and_its_version_must_be_its_manifests():
    pointer = pointer_for(FILES)
    assert pub.parse_pointer(pointer.to_json(), WHERE) == pointer
    doc = json.loads(pointer.to_json())
    doc["manifest"]["config.yaml"] = "0" * 64
    with pytest.raises(SourceError, match="its version is not its manifest's"):
        pub.parse_pointer(json.dumps(doc).encode(), WHERE)


@pytest.mark.parametrize("data,why", [
    (b"{nope", "not JSON"),
    (b'{"format": 2}', "format must be 1"),
    (b'{"format": 1, "manifest": {"../x": "' + b"0" * 64 + b'"}}', "safe file paths"),
    (b'{"format": 1, "manifest": {"a": "' + b"0" * 64 + b'"}, "serial": -1}', "missing or wrong"),
])
def test_a_broken_pointer_says_what_is_wrong_and_what_to_do(data, why):
    with pytest.raises(SourceError, match=why) as err:
        pub.parse_pointer(data, WHERE)
    assert err.value.where == WHERE and "rollback" in err.value.hint


def test_publications_keep_the_history_newest_first_and_bounded():
    pointer = pointer_for(FILES)
    for n in range(pub.HISTORY + 5):
        pointer = pointer_for({**FILES, "n": str(n).encode()}, pointer)
    assert pointer.serial == pub.HISTORY + 6
    assert [h["serial"] for h in pointer.history] == list(range(pub.HISTORY + 5, 5, -1))
    assert pointer.changed == ("~n",)
    lines = history_lines(pointer)
    assert lines[0].split()[:2] == [str(pointer.serial), pointer.version[:12]]
    assert "1 file(s) changed: ~n" in lines[0]


def test_changed_files_name_added_removed_and_changed():
    old = {"a": "1", "b": "2", "c": "3"}
    assert pub.changed_files(old, {"a": "1", "b": "9", "d": "4"}) == ["~b", "-c", "+d"]


@pytest.fixture(scope="module")
def keys():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    def pair():
        key = ed25519.Ed25519PrivateKey.generate()
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, public
    return pair(), pair()


def test_a_signature_verifies_and_anything_changed_under_it_does_not(keys):
    (private, public), (_, other_public) = keys
    signed = pub.sign(pointer_for(FILES), private, "publish --sign")
    pub.verify(signed, public, WHERE)
    with pytest.raises(SourceError, match="not valid"):
        pub.verify(signed, other_public, WHERE)
    with pytest.raises(SourceError, match="not valid"):
        pub.verify(replace(signed, serial=signed.serial + 1), public, WHERE)
    with pytest.raises(SourceError, match="not signed"):
        pub.verify(replace(signed, signature=None), public, WHERE)


def test_a_key_of_the_wrong_kind_is_a_config_error(keys):
    (private, public), _ = keys
    with pytest.raises(ConfigError, match="ed25519 public key"):
        pub.verify(pointer_for(FILES), private, "stack.verify_key")
    with pytest.raises(ConfigError, match="openssl genpkey"):
        pub.sign(pointer_for(FILES), b"not a key", "publish --sign")


def test_a_diff_masks_secrets_and_never_shows_a_private_key():
    new = {**FILES, "config.yaml": FILES["config.yaml"].replace(b"s3cret", b"n3w-s3cret"),
           "ssl.key": b"-----BEGIN PRIVATE KEY-----\nxyz\n"}
    text = "".join(diff_lines(FILES, new, ["s3cret", "n3w-s3cret"], "A", "B"))
    assert "s3cret" not in text and "~ config.yaml: only secret values changed" in text
    new["config.yaml"] += b"SERVER_HOSTNAME: other\n"
    text = "".join(diff_lines(FILES, new, ["s3cret", "n3w-s3cret"], "A", "B"))
    assert "s3cret" not in text and "+SERVER_HOSTNAME: other" in text
    assert f" DB_URI: postgresql://q:{MASK}@db/q" in text or \
        f"+DB_URI: postgresql://q:{MASK}@db/q" in text
    assert "~ ssl.key: content not shown" in text and "xyz" not in text
    assert "extra_ca_certs" not in text  # unchanged files are not listed


def test_the_published_log_line_names_at_most_twenty_changed_files(tmp_path):
    """A first publication of 1,000 files is one readable line, not every name."""
    import structlog

    from quay_bootstrap.publish import LOGGED_CHANGES, Publisher
    from quay_bootstrap.stores.put import uploader

    leases = pub.open_published(None, f"file://{tmp_path}/conf/stack")
    files = {f"f{i:03d}.txt": b"x" for i in range(30)}
    with structlog.testing.capture_logs() as logs:
        outcome = Publisher(leases, LIMITS, uploader(leases), by="ops@laptop").publish(files)
    line, = [e for e in logs if e["event"] == "stack.published"]
    assert outcome.published and len(outcome.pointer.changed) == 30
    assert line["changed"] == [f"+f{i:03d}.txt" for i in range(LOGGED_CHANGES)]
    assert line["changed_count"] == 30
