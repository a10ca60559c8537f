"""The store registry, the settings the lease client shares with the source, and directory leases."""
from __future__ import annotations

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


def test_s3_clients_share_one_session_per_aws_environment(monkeypatch):
    """A second session would load the service models again (13 MiB); a changed AWS_*
    environment (credentials) gets a session of its own."""
    from quay_bootstrap.stores import s3

    monkeypatch.setattr(s3, "_SESSIONS", {})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "first")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    s3.client("s3://bucket/conf/stack", None)
    s3.client("s3://bucket/conf/stack.rollout", None)
    assert len(s3._SESSIONS) == 1
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second")
    s3.client("s3://bucket/conf/stack", None)
    assert len(s3._SESSIONS) == 2
