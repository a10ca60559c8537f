"""Registry credentials from ECR: boto3's get_authorization_token against moto over HTTP."""
from __future__ import annotations

from quay_bootstrap.config import AuthConfig
from quay_bootstrap.image import registry_auth


def test_ecr_token_becomes_pull_credentials_and_is_redacted(s3, moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    secrets = []
    auth = registry_auth(AuthConfig(ecr=True), "123456789012.dkr.ecr.us-east-1.amazonaws.com",
                         secrets.extend)
    assert auth["username"] == "AWS" and auth["password"]
    assert auth["password"] in secrets
