"""Sample conf/stacks for tests: a valid 21-file one full of known secrets, and broken ones."""
from __future__ import annotations

from typing import Dict

import yaml

# Every value here is a secret that must never reach a log line or an error message.
SECRETS = {
    "db": "DbPassw0rd-7f3a9c",
    "secret_key": "SecretKey-0b1c2d3e4f",
    "database_secret_key": "DatabaseSecretKey-9e8d7c",
    "redis": "RedisPassw0rd-55aa",
    "s3_access": "AKIAEXAMPLE7Q2W3E4R",
    "s3_secret": "S3SecretKey-wJalrXUtnFEMI",
    "ldap": "LdapAdminPw-31337",
    "psk": "ScannerPsk-c0ffee",
    "client_secret": "GithubClientSecret-abc123",
}
SSL_KEY = ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC-private-key-body-"
           "Zm9vYmFy\n-----END PRIVATE KEY-----\n")


def quay_config(**overrides) -> Dict:
    config = {
        "PREFERRED_URL_SCHEME": "https",
        "SERVER_HOSTNAME": "quay.example.com",
        "DB_URI": f"postgresql://quay:{SECRETS['db']}@db.example.com:5432/quay",
        "AUTHENTICATION_TYPE": "LDAP",
        "LDAP_ADMIN_PASSWD": SECRETS["ldap"],
        "DISTRIBUTED_STORAGE_CONFIG": {"default": ["S3Storage", {
            "s3_bucket": "quay-blobs", "storage_path": "/datastorage",
            "s3_access_key": SECRETS["s3_access"], "s3_secret_key": SECRETS["s3_secret"]}]},
        "DISTRIBUTED_STORAGE_PREFERENCE": ["default"],
        "BUILDLOGS_REDIS": {"host": "redis.example.com", "port": 6379,
                            "password": SECRETS["redis"]},
        "USER_EVENTS_REDIS": {"host": "redis.example.com", "port": 6379,
                              "password": SECRETS["redis"]},
        "DEFAULT_TAG_EXPIRATION": "2w",
        "TAG_EXPIRATION_OPTIONS": ["2w"],
        "SETUP_COMPLETE": True,
        "SECRET_KEY": SECRETS["secret_key"],
        "DATABASE_SECRET_KEY": SECRETS["database_secret_key"],
        "SECURITY_SCANNER_V4_PSK": SECRETS["psk"],
        "GITHUB_LOGIN_CONFIG": {"CLIENT_ID": "id", "CLIENT_SECRET": SECRETS["client_secret"]},
    }
    config.update(overrides)
    return config


def sample_stack(**overrides) -> Dict[str, bytes]:
    """21 files: config.yaml, TLS pair, CA bundle folder, LDAP CA, robots.txt, favicon."""
    files = {
        "config.yaml": yaml.safe_dump(quay_config(**overrides)).encode(),
        "ssl.cert": b"-----BEGIN CERTIFICATE-----\nMIIcert\n-----END CERTIFICATE-----\n",
        "ssl.key": SSL_KEY.encode(),
        "ldap.crt": b"-----BEGIN CERTIFICATE-----\nMIIldap\n-----END CERTIFICATE-----\n",
        "robots.txt": b"User-agent: *\nDisallow: /\n",
        "favicon.ico": bytes(range(256)) * 4,
    }
    for i in range(15):
        files[f"extra_ca_certs/ca-{i:02d}.crt"] = (
            f"-----BEGIN CERTIFICATE-----\nMIIca{i}\n-----END CERTIFICATE-----\n".encode())
    return files
