"""conf/stack checks before a switch, and the secrets found for redaction."""
import pytest
import yaml

from quay_bootstrap.stack.validate import REQUIRED_KEYS, check_stack, stack_secrets

GOOD = {
    "PREFERRED_URL_SCHEME": "https", "SERVER_HOSTNAME": "quay.example.com",
    "DB_URI": "postgresql://quay:DbPassw0rd@db/quay", "AUTHENTICATION_TYPE": "Database",
    "DISTRIBUTED_STORAGE_CONFIG": {"default": ["S3Storage", {"s3_access_key": "AKIA1234",
                                                             "s3_secret_key": "S3Secret!!"}]},
    "DISTRIBUTED_STORAGE_PREFERENCE": ["default"],
    "BUILDLOGS_REDIS": {"host": "redis", "password": "RedisPw1"},
    "USER_EVENTS_REDIS": {"host": "redis", "password": "RedisPw2"},
    "DEFAULT_TAG_EXPIRATION": "2w", "TAG_EXPIRATION_OPTIONS": ["2w"], "SETUP_COMPLETE": True,
    "SECRET_KEY": "sk-value", "DATABASE_SECRET_KEY": "dbsk-value",
}
FILES = ["config.yaml", "ssl.cert", "ssl.key"]


def dump(config):
    return yaml.safe_dump(config).encode()


def test_good_stack_passes_without_warnings():
    checked = check_stack(FILES, dump(GOOD))
    assert checked.ok and not checked.warnings


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_each_required_key(key):
    config = {k: v for k, v in GOOD.items() if k != key}
    checked = check_stack(FILES, dump(config))
    assert checked.errors == ((f"config.yaml: {key}", "required by Quay's schema but missing"),)


def test_tls_files_required_only_when_quay_terminates_tls():
    checked = check_stack(["config.yaml"], dump(GOOD))
    assert [w for w, _ in checked.errors] == ["ssl.cert", "ssl.key"]
    assert check_stack(["config.yaml"], dump({**GOOD, "EXTERNAL_TLS_TERMINATION": True})).ok
    assert check_stack(["config.yaml"], dump({**GOOD, "PREFERRED_URL_SCHEME": "http"})).ok


@pytest.mark.parametrize("content,expect", [
    (None, "missing"),
    (b"a: [", "not valid YAML"),
    (b"- just\n- a list\n", "must be a YAML mapping"),
    (b"\xff\xfe", "not UTF-8"),
    (b"!!python/object/apply:os.system ['true']", "not valid YAML"),
])
def test_bad_config_yaml(content, expect):
    checked = check_stack(FILES, content)
    assert not checked.ok and expect in checked.errors[0][1]


def test_missing_config_points_at_a_nested_one():
    checked = check_stack(["conf/stack/config.yaml"], None)
    assert "should stack.source end with /conf/stack?" in checked.errors[0][1]


def test_warnings_do_not_block():
    config = {k: v for k, v in GOOD.items() if k not in ("SECRET_KEY", "DATABASE_SECRET_KEY")}
    checked = check_stack(FILES, dump({**config, "SETUP_COMPLETE": False}))
    assert checked.ok
    assert [w for w, _ in checked.warnings] == ["config.yaml: SETUP_COMPLETE",
                                                "config.yaml: SECRET_KEY",
                                                "config.yaml: DATABASE_SECRET_KEY"]


def test_secrets_found_everywhere_quay_keeps_them():
    found = stack_secrets({**GOOD, "LDAP_ADMIN_PASSWD": "ldapPw", "MAIL_PASSWORD": "mailPw",
                           "SECURITY_SCANNER_V4_PSK": "psk-val",
                           "GITHUB_LOGIN_CONFIG": {"CLIENT_SECRET": "ghsecret"},
                           "RECAPTCHA_SECRET_KEY": "recap",
                           "HEALTH_CHECKER": ["RDSAwareHealthCheck", {"secret_key": "rdssk"}]})
    for value in ("DbPassw0rd", "S3Secret!!", "AKIA1234", "RedisPw1", "RedisPw2", "sk-value",
                  "dbsk-value", "ldapPw", "mailPw", "psk-val", "ghsecret", "recap", "rdssk"):
        assert value in found
    assert "quay.example.com" not in found and "redis" not in found
