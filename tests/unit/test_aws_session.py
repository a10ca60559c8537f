"""The process's one botocore session: shared by every client, one per AWS_* environment, and
its trimmed endpoint table resolving every client the agent makes exactly as botocore's own."""
from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import botocore.session
import pytest

from quay_bootstrap import aws_session
from quay_bootstrap.stores import s3

# (service, region, endpoint_url): each partition, FIPS-only and China regions, S3's global
# us-east-1, and an S3-compatible store.
CASES = [
    (service, region, None)
    for service in ("s3", "ecr", "autoscaling", "rds")
    for region in ("us-east-1", "eu-west-1", "us-gov-west-1", "cn-north-1", "ap-southeast-5")
] + [("s3", "us-east-1", "http://127.0.0.1:8333"), ("s3", None, "https://rgw.example.internal"),
      ("s3", None, None)]
OPERATION = {"s3": ("get_object", {"Bucket": "quay-conf", "Key": "conf/stack/config.yaml"}),
             "ecr": ("get_authorization_token", {}),
             "autoscaling": ("describe_auto_scaling_instances", {"InstanceIds": ["i-0abc"]}),
             "rds": ("describe_db_instances", {"DBInstanceIdentifier": "quay"}),
             "sts": ("get_caller_identity", {})}


@pytest.fixture
def keys(monkeypatch):
    monkeypatch.setattr(aws_session, "_SESSIONS", {})
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "secret",
                        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)


def where(client, service: str) -> tuple:
    """Where a request of the client goes and the scope it is signed for (region and service;
    the rest of the query, holding the signature's date, left out)."""
    name, params = OPERATION[service]
    url = urlsplit(client.generate_presigned_url(name, Params=params))
    query = parse_qs(url.query)
    # S3 presigns with SigV2 by default (no scope in the URL): the host and path say it all.
    credential = query.get("X-Amz-Credential", ["SigV2"])[0]
    scope = credential.split("/")[2:4]
    return client.meta.region_name, url.scheme, url.netloc, url.path, scope


@pytest.mark.parametrize("service,region,endpoint_url", CASES)
def test_a_client_of_the_trimmed_session_resolves_as_botocores_own(keys, service, region, endpoint_url):
    ours = aws_session.client(service, region_name=region, endpoint_url=endpoint_url)
    theirs = botocore.session.Session().create_client(service, region_name=region,
                                                      endpoint_url=endpoint_url)
    assert where(ours, service) == where(theirs, service)


@pytest.mark.parametrize("region", [None, "aws-global", "us-east-1", "eu-west-1", "cn-north-1"])
def test_the_credential_providers_sts_resolves_as_botocores_own(keys, region):
    """botocore's assume-role provider makes its STS client from the session itself; with no
    region or aws-global, STS is resolved from the endpoint table."""
    aws_session.client("s3", region_name="us-east-1")  # the session, trimmed
    session, = aws_session._SESSIONS.values()
    ours = session.create_client("sts", region_name=region)
    theirs = botocore.session.Session().create_client("sts", region_name=region)
    assert where(ours, "sts") == where(theirs, "sts")


def test_the_trimmed_table_keeps_every_partition_and_only_the_agents_services(keys):
    aws_session.client("s3", region_name="us-east-1")
    session, = aws_session._SESSIONS.values()
    table = session.get_component("data_loader").load_data("endpoints")
    full = botocore.session.Session().get_component("data_loader").load_data("endpoints")
    assert [p["partition"] for p in table["partitions"]] == [p["partition"] for p in full["partitions"]]
    for partition in table["partitions"]:
        assert set(partition["services"]) <= aws_session.KEPT
        assert partition["regions"]
    assert {"s3", "sts", "api.ecr"} <= set(table["partitions"][0]["services"])
    # The endpoint resolver every client is made with sees the trimmed table, not a copy.
    assert session.get_available_regions("ec2") == []
    assert "eu-west-1" in session.get_available_regions("s3")
    assert "eu-west-1" in botocore.session.Session().get_available_regions("ec2")


def test_clients_share_one_session_per_aws_environment(keys, monkeypatch):
    """A second session would load the endpoint table and the models again; a changed AWS_*
    environment (credentials) gets a session of its own."""
    s3.client("s3://bucket/conf/stack", None)
    s3.client("s3://bucket/conf/stack.rollout", None)
    aws_session.client("autoscaling", region_name="us-east-1")
    assert len(aws_session._SESSIONS) == 1
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "second")
    s3.client("s3://bucket/conf/stack", None)
    assert len(aws_session._SESSIONS) == 2
    assert sorted(aws_session.credential_secrets()) == ["AKIDEXAMPLE", "second", "secret", "secret"]


def test_a_service_the_agent_did_not_declare_is_refused(keys):
    with pytest.raises(ValueError, match="'ec2' is not in SERVICES"):
        aws_session.client("ec2", region_name="us-east-1")
