"""The store registry, the settings the lease client shares with the source, and directory leases."""
from __future__ import annotations

import os

import pytest

from quay_bootstrap import stores
from quay_bootstrap.config import StackConfig
from quay_bootstrap.errors import ConfigError
from quay_bootstrap.stores.file import FileLeases


def test_the_registry_names_every_scheme_config_accepts():
    assert stores.schemes() == ("s3", "gs", "file")
    for scheme in stores.schemes():
        StackConfig(source=f"{scheme}://bucket/conf/stack")


@pytest.mark.parametrize("opener", [
    lambda: stores.open_source("ftp://host/conf/stack"),
    lambda: stores.open_object("ftp://host/quay-lock.yaml"),
    lambda: stores.open_leases(StackConfig.model_construct(source="ftp://host/conf/stack")),
    lambda: stores.open_store(StackConfig.model_construct(source="ftp://host/conf/stack",
                                                          concurrency=4)),
])
def test_an_unknown_scheme_is_a_config_error_naming_the_known_ones(opener):
    with pytest.raises(ConfigError) as caught:
        opener()
    text = str(caught.value)
    assert "'ftp'" in text and "s3://, gs://, file://" in text


@pytest.mark.parametrize("section,body", [
    ("stack", "{source: ftp://host/conf/stack}"),
    ("image", "{reference: quay.io/projectquay/quay:v3.9.0, lock: ftp://host/lock.yaml}"),
])
def test_config_refuses_an_unknown_scheme_naming_the_known_ones(section, body):
    from quay_bootstrap.config import parse_config

    text = "stack: {source: s3://b/conf/stack}\nimage: {reference: quay.io/projectquay/quay:v3.9.0}\n"
    text += f"{section}: {body}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    problems = dict(caught.value.problems)
    key = "stack.source" if section == "stack" else "image.lock"
    assert "expected one of s3://..., gs://..., file://..." in problems[key]


def test_leases_live_beside_the_stack_not_in_it():
    assert stores.lease_prefix("s3://b/conf/stack/") == "s3://b/conf/stack.rollout"


@pytest.fixture
def s3_stack(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "test")
    ca = tmp_path / "private-ca.pem"
    ca.write_text("not read until a connection is made\n")
    return StackConfig(source="s3://bucket/conf/stack", endpoint_url="https://rgw.internal:8443",
                       region="eu-west-3", ca_bundle=ca, concurrency=8)


def _settings(client):
    """What a call through this botocore client is made with. botocore keeps `verify` only on
    the endpoint's HTTP session, not in client.meta.config."""
    config = client.meta.config
    return dict(verify=client._endpoint.http_session._verify,
                endpoint=client.meta.endpoint_url, region=client.meta.region_name,
                connect_timeout=config.connect_timeout, read_timeout=config.read_timeout,
                retries=config.retries, s3=config.s3,
                request_checksums=getattr(config, "request_checksum_calculation", None),
                response_checksums=getattr(config, "response_checksum_validation", None))


def test_s3_leases_carry_every_setting_of_the_source(s3_stack):
    source = stores.open_source(s3_stack.source, s3_stack, concurrency=s3_stack.concurrency)
    leases = stores.open_leases(s3_stack)
    expected = dict(verify=str(s3_stack.ca_bundle), endpoint="https://rgw.internal:8443",
                    region="eu-west-3", connect_timeout=5, read_timeout=30,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    s3={"addressing_style": "path"},
                    request_checksums="when_required", response_checksums="when_required")
    assert _settings(source.client) == expected
    assert _settings(leases.client) == expected
    assert (leases.bucket, leases.prefix) == ("bucket", "conf/stack.rollout/")


def test_one_store_shares_one_client_between_source_and_leases(s3_stack):
    store = stores.open_store(s3_stack)
    assert store.source.client is store.leases.client
    assert store.source.client.meta.config.max_pool_connections == 8
    assert (store.source.prefix, store.leases.prefix) == ("conf/stack/", "conf/stack.rollout/")


def test_s3_without_endpoint_or_ca_bundle_leaves_botocore_its_defaults(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/pki/operator-chosen.pem")
    leases = stores.open_leases(StackConfig(source="s3://bucket/conf/stack", region="us-east-1"))
    assert leases.client.meta.config.s3 == {"addressing_style": "auto"}
    assert leases.client._endpoint.http_session._verify == "/etc/pki/operator-chosen.pem"


def test_file_store_opens_source_and_leases_beside_it(tmp_path):
    store = stores.open_store(StackConfig(source=f"file://{tmp_path}/stack"))
    assert store.source.root == tmp_path / "stack"
    assert store.leases.root == tmp_path / "stack.rollout"
    assert stores.open_leases(StackConfig(source=f"file://{tmp_path}/stack")).root == \
        tmp_path / "stack.rollout"


@pytest.fixture
def leases(tmp_path):
    return FileLeases(f"file://{tmp_path}/leases")


def test_file_create_is_exclusive(leases):
    assert leases.get("lease-0") is None
    assert leases.create("lease-0", b"a")
    assert not leases.create("lease-0", b"b")
    assert leases.get("lease-0")[0] == b"a"


def test_file_replace_needs_the_token_last_read(leases):
    leases.create("lease-0", b"a")
    _, token = leases.get("lease-0")
    assert leases.replace("lease-0", b"c", token)
    assert not leases.replace("lease-0", b"d", token)  # someone else's take-over came first
    assert leases.get("lease-0")[0] == b"c"


def test_file_tokens_change_with_every_write_even_within_one_clock_tick(leases):
    leases.create("lease-0", b"a")
    tokens = [leases.get("lease-0")[1]]
    for body in (b"b", b"c", b"d"):
        assert leases.replace("lease-0", body, tokens[-1])
        tokens.append(leases.get("lease-0")[1])
    assert len(set(tokens)) == 4


def test_file_replace_of_a_missing_lease_fails(leases):
    leases.create("lease-0", b"a")
    _, token = leases.get("lease-0")
    leases.delete("lease-0")
    assert not leases.replace("lease-0", b"b", token)
    assert leases.get("lease-0") is None


def test_file_delete_of_a_missing_lease_is_quiet(leases):
    leases.delete("lease-0")
    leases.create("lease-0", b"a")
    leases.delete("lease-0")
    assert leases.get("lease-0") is None and leases.create("lease-0", b"b")


def test_file_leases_leave_no_temporary_files(leases):
    leases.create("lease-0", b"a")
    leases.create("lease-0", b"b")
    leases.replace("lease-0", b"c", leases.get("lease-0")[1])
    names = sorted(p.name for p in leases.root.iterdir())
    assert names == [".lock", "lease-0"]


# --- file:// reads: never through a link, always the file the listing saw -------------------

@pytest.fixture
def stack_dir(tmp_path):
    """A stack directory of two files, one in a folder; a root-only secret beside it, of the
    same size as the folder's file (a same-size swap must be caught by more than the size)."""
    root = tmp_path / "stack"
    (root / "extra_ca_certs").mkdir(parents=True)
    (root / "config.yaml").write_bytes(b"SERVER_HOSTNAME: quay.example.com\n")
    (root / "extra_ca_certs" / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$hash:19000::".ljust(27, b"x") + b"\n")
    assert secret.stat().st_size == (root / "extra_ca_certs" / "ca.crt").stat().st_size
    secret.chmod(0o600)
    return root


def _listed(source):
    return {obj.key: obj for obj in source.list()}


def _fetch(source, root, stack_store_dir):
    """The real fetch into a stack folder; returns what went live (None when refused)."""
    from quay_bootstrap.stack.fetch import Fetcher
    from quay_bootstrap.stack.plan import Limits
    from quay_bootstrap.stack.store import StackStore

    store = StackStore(stack_store_dir, None)
    Fetcher(source, store, Limits(100, 1 << 20), concurrency=2, deadline=1,
            sleep=lambda s: None).fetch()
    return store.current()


def test_a_file_reads_back_as_listed(stack_dir):
    from quay_bootstrap.stores.file import FileSource

    source = FileSource(f"file://{stack_dir}")
    listed = _listed(source)
    assert sorted(listed) == ["config.yaml", "extra_ca_certs/ca.crt"]
    assert source.read(listed["extra_ca_certs/ca.crt"]).data == b"-----BEGIN CERTIFICATE-----\n"


def test_a_link_inside_the_directory_is_read_through_to_the_file_it_named(stack_dir):
    from quay_bootstrap.stores.file import FileSource

    (stack_dir / "ssl.cert").symlink_to("extra_ca_certs/ca.crt")
    source = FileSource(f"file://{stack_dir}")
    obj = _listed(source)["ssl.cert"]
    assert source.read(obj).data == b"-----BEGIN CERTIFICATE-----\n"
    # Re-pointed between the listing and the read: the read opens what the listing resolved,
    # never the link, so the secret is not read even though it is the same size.
    (stack_dir / "ssl.cert").unlink()
    (stack_dir / "ssl.cert").symlink_to(stack_dir.parent / "shadow")
    assert source.read(obj).data == b"-----BEGIN CERTIFICATE-----\n"


def test_a_file_swapped_for_a_link_after_listing_is_refused_and_nothing_is_copied(
        stack_dir, tmp_path):
    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stores.file import FileSource

    source = FileSource(f"file://{stack_dir}")
    listed = source.list
    swapped = []

    def list_then_swap(limit=None):
        objects = listed(limit)
        target = stack_dir / "extra_ca_certs" / "ca.crt"
        target.unlink()
        target.symlink_to(tmp_path / "shadow")  # same size as the listed file
        swapped.append(target)
        return objects

    source.list = list_then_swap
    with pytest.raises(SourceError) as caught:
        _fetch(source, stack_dir, tmp_path / "live")
    assert swapped
    text = str(caught.value)
    assert "'extra_ca_certs/ca.crt'" in text and "symbolic link" in text
    assert "nothing was copied" in text and "a link may have been planted" in text
    assert f"file://{stack_dir}/extra_ca_certs/ca.crt" in text
    live = tmp_path / "live"
    assert not (live / "current").exists()
    copied = [p for p in live.rglob("*") if p.is_file() and b"root:" in p.read_bytes()]
    assert copied == []


@pytest.mark.parametrize("how", ["link-to-folder", "link-inside"])
def test_a_folder_swapped_for_a_link_after_listing_is_refused(stack_dir, tmp_path, how):
    """A symlinked folder on the path is refused even when the file behind it has the listed
    size, and even when the link stays inside the stack directory."""
    import shutil

    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stores.file import FileSource

    source = FileSource(f"file://{stack_dir}")
    obj = _listed(source)["extra_ca_certs/ca.crt"]
    elsewhere = tmp_path / "elsewhere" if how == "link-to-folder" else stack_dir / "moved"
    shutil.move(str(stack_dir / "extra_ca_certs"), str(elsewhere))
    (stack_dir / "extra_ca_certs").symlink_to(elsewhere)
    with pytest.raises(SourceError) as caught:
        source.read(obj)
    text = str(caught.value)
    assert "'extra_ca_certs/ca.crt'" in text
    assert "the folder 'extra_ca_certs' on its path is a symbolic link" in text


def test_a_file_that_grew_after_listing_is_refused(stack_dir, tmp_path):
    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stores.file import FileSource

    source = FileSource(f"file://{stack_dir}")
    obj = _listed(source)["config.yaml"]
    with open(stack_dir / "config.yaml", "ab") as grown:
        grown.write(b"x" * 4096)
    with pytest.raises(SourceError) as caught:
        source.read(obj)
    text = str(caught.value)
    assert "'config.yaml'" in text and f"now holds {obj.size + 4096} bytes" in text
    assert "listing saw " + str(obj.size) in text


def test_a_file_replaced_by_another_of_the_same_size_is_refused(stack_dir):
    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stores.file import FileSource

    source = FileSource(f"file://{stack_dir}")
    obj = _listed(source)["config.yaml"]
    replacement = stack_dir / ".config.yaml.new"
    replacement.write_bytes(b"X" * obj.size)
    os.replace(replacement, stack_dir / "config.yaml")
    with pytest.raises(SourceError) as caught:
        source.read(obj)
    assert "another file than the one listed" in str(caught.value)


def test_a_fifo_planted_after_listing_is_refused_without_hanging(stack_dir):
    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stores.file import FileSource

    source = FileSource(f"file://{stack_dir}")
    obj = _listed(source)["config.yaml"]
    (stack_dir / "config.yaml").unlink()
    os.mkfifo(stack_dir / "config.yaml")
    with pytest.raises(SourceError) as caught:
        source.read(obj)
    assert "no longer a regular file" in str(caught.value)


def test_get_refuses_a_link_and_an_oversized_file(tmp_path):
    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stores import SMALL_OBJECT
    from quay_bootstrap.stores.file import FileSource

    (tmp_path / "quay-lock.yaml").write_bytes(b"reference: x\n")
    source = FileSource(f"file://{tmp_path}")
    assert source.get("quay-lock.yaml") == b"reference: x\n"
    (tmp_path / "linked.yaml").symlink_to(tmp_path / "quay-lock.yaml")
    with pytest.raises(SourceError, match="symbolic link"):
        source.get("linked.yaml")
    (tmp_path / "big.yaml").write_bytes(b"x" * (SMALL_OBJECT + 1))
    with pytest.raises(SourceError, match="larger than"):
        source.get("big.yaml")


# --- bounded reads, as every store uses them -------------------------------------------------

class _Body:
    """A body of `size` bytes made as it is read, counting what was asked for."""

    def __init__(self, size):
        self.left, self.calls, self.given = size, [], 0

    def read(self, n):
        self.calls.append(n)
        part = b"x" * min(n, self.left)
        self.left -= len(part)
        self.given += len(part)
        return part


def test_a_small_body_is_one_read_of_its_size_plus_one_then_the_end():
    body = _Body(300)
    assert stores.read_at_most(body.read, 300) == b"x" * 300
    assert body.calls == [301, 1]


def test_a_longer_body_stops_one_byte_past_the_limit_however_long_it_is():
    body = _Body(200 << 20)
    data = stores.read_at_most(body.read, 3 << 20)
    assert len(data) == (3 << 20) + 1 and body.given == (3 << 20) + 1
    assert max(body.calls) == stores.CHUNK
    from quay_bootstrap.errors import CorruptDownload

    with pytest.raises(CorruptDownload, match="more than the 3145728 bytes it listed"):
        stores.check_not_longer(data, 3 << 20, "s3://b/k")


def test_the_bounded_buffer_refuses_the_write_that_would_pass_the_limit():
    """What GCS downloads write into: the SDK's chunked writes stop at the listed size."""
    from quay_bootstrap.errors import CorruptDownload

    buffer = stores.BoundedBuffer(10, "gs://b/conf/stack/k")
    buffer.write(b"12345")
    buffer.write(b"67890")
    with pytest.raises(CorruptDownload, match="gs://b/conf/stack/k: the store sent more than the 10"):
        buffer.write(b"!")
    assert buffer.getvalue() == b"1234567890"


def test_a_listing_stops_once_past_the_limit(tmp_path):
    """What stack.max_files allows, plus one, tells the fetch to refuse; no more is listed."""
    from quay_bootstrap.stores.file import FileSource

    for folder in range(5):
        (tmp_path / f"d{folder}").mkdir()
        for i in range(10):
            (tmp_path / f"d{folder}" / f"f{i}").write_bytes(b"x")
    source = FileSource(f"file://{tmp_path}")
    assert len(source.list()) == 50
    assert 12 <= len(source.list(limit=11)) <= 20  # stops after the folder that passed it
    assert len(source.list(limit=50)) == 50


@pytest.mark.parametrize("umask", [0o000, 0o077])
def test_file_lease_folders_and_lock_are_private_whatever_the_umask(tmp_path, umask):
    """A lease folder others could write would let any local user take or block the slots."""
    from quay_bootstrap.stores.file import FileLeases

    saved = os.umask(umask)
    try:
        leases = FileLeases(f"file://{tmp_path}/srv/stack.rollout")
        assert leases.create("slot-0", b"me")
        assert leases.replace("slot-0", b"me again", leases.get("slot-0")[1])
    finally:
        os.umask(saved)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in
             (tmp_path / "srv", tmp_path / "srv" / "stack.rollout",
              tmp_path / "srv" / "stack.rollout" / ".lock", tmp_path / "srv" / "stack.rollout" / "slot-0")}
    assert modes == {"srv": "0o750", "stack.rollout": "0o750", ".lock": "0o600", "slot-0": "0o600"}


def test_a_file_listing_stops_inside_one_big_folder(tmp_path):
    from quay_bootstrap.stores.file import FileSource

    for n in range(50):
        (tmp_path / f"f{n:02d}").write_bytes(b"x")
    assert len(FileSource(f"file://{tmp_path}").list(limit=10)) == 11


def test_s3_keys_from_a_shared_credentials_file_are_handed_to_the_redactor(tmp_path, monkeypatch):
    """AWS keys however they arrive: here not in the environment but in a credentials file."""
    from quay_bootstrap.stores import s3

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    shared = tmp_path / "credentials"
    shared.write_text("[default]\naws_access_key_id = AKIAFILEKEY000000000\n"
                      "aws_secret_access_key = FileSecretKey-0123456789abcdef\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(shared))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask an instance profile here
    source = s3.S3Source("s3://bucket/conf/stack", s3.client("s3://bucket/conf/stack", None))
    assert {"AKIAFILEKEY000000000", "FileSecretKey-0123456789abcdef"} <= set(source.secrets())


def test_a_read_only_lease_folder_says_how_to_allow_it(tmp_path, monkeypatch):
    """Under the unit's ProtectSystem=strict, a lease folder beside a file:// stack is read-only
    until a drop-in allows it: the error says so, instead of a bare EROFS at every poll."""
    import errno

    from quay_bootstrap.errors import SourceError
    from quay_bootstrap.stores import file

    def read_only(folder, *args):
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(file, "make_dirs", read_only)
    leases = file.FileLeases(f"file://{tmp_path}/stack.rollout")
    with pytest.raises(SourceError) as caught:
        leases.create("slot-0", b"me")
    assert f"ReadWritePaths={tmp_path}/stack.rollout" in str(caught.value)
    assert not (tmp_path / "stack.rollout").exists()


def test_the_gcs_client_starts_no_bucket_metadata_thread(monkeypatch):
    """google-cloud-storage 3.x would GET each bucket's metadata from a thread of its own, only
    to label trace spans: a request the node's role need not allow, on every agent start."""
    from quay_bootstrap.stores import gcs

    tracing = pytest.importorskip("google.cloud.storage._opentelemetry_tracing")
    if not hasattr(tracing, "_is_bucket_metadata_disabled"):
        pytest.skip("this google-cloud-storage has no bucket metadata thread")

    monkeypatch.delenv("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # no credentials needed
    gcs.client("gs://bucket/conf/stack", None)
    assert tracing._is_bucket_metadata_disabled()
