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


def tls_pair(hostname: str = "quay.example.com") -> Dict[str, bytes]:
    """A self-signed ssl.cert/ssl.key for HOSTNAME, as Quay's config-tool accepts them."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(key, hashes.SHA256()))
    return {"ssl.cert": cert.public_bytes(serialization.Encoding.PEM),
            "ssl.key": key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())}


TLS = tls_pair()
SSL_KEY = TLS["ssl.key"].decode()


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
        "ssl.cert": TLS["ssl.cert"],
        "ssl.key": TLS["ssl.key"],
        "ldap.crt": b"-----BEGIN CERTIFICATE-----\nMIIldap\n-----END CERTIFICATE-----\n",
        "robots.txt": b"User-agent: *\nDisallow: /\n",
        "favicon.ico": bytes(range(256)) * 4,
    }
    for i in range(15):
        files[f"extra_ca_certs/ca-{i:02d}.crt"] = (
            f"-----BEGIN CERTIFICATE-----\nMIIca{i}\n-----END CERTIFICATE-----\n".encode())
    return files
