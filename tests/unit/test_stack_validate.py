"""conf/stack checks before a switch, and the secrets found for redaction."""
import pytest
import yaml

from quay_bootstrap.stack.validate import check_stack, stack_secrets
from tests.testbed.stacks import tls_pair

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


# What stops Quay at start (quay-facts.md, "conf/stack"): each one alone is an error.
@pytest.mark.parametrize("change, key, says", [
    ({"SERVER_HOSTNAME": None}, "SERVER_HOSTNAME", "is missing"),
    ({"SERVER_HOSTNAME": "quay example.com"}, "SERVER_HOSTNAME", "not a valid host name"),
    ({"PREFERRED_URL_SCHEME": "HTTPS"}, "PREFERRED_URL_SCHEME", "exactly http or https"),
    ({"DB_URI": None}, "DB_URI", "is missing"),
    ({"BUILDLOGS_REDIS": {"port": 6379}}, "BUILDLOGS_REDIS", "needs a `host`"),
    ({"USER_EVENTS_REDIS": None}, "USER_EVENTS_REDIS", "needs a `host`"),
    ({"DISTRIBUTED_STORAGE_CONFIG": {}}, "DISTRIBUTED_STORAGE_CONFIG", "missing or empty"),
    ({"DEFAULT_TAG_EXPIRATION": "3w"}, "DEFAULT_TAG_EXPIRATION", "one of TAG_EXPIRATION_OPTIONS"),
    ({"SETUP_COMPLETE": False}, "SETUP_COMPLETE", "is not true"),
    ({"SETUP_COMPLETE": None}, "SETUP_COMPLETE", "is not true"),
    ({"DATABASE_SECRET_KEY": None}, "DATABASE_SECRET_KEY", "is missing"),
])
def test_what_stops_quay_is_an_error(change, key, says):
    config = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    checked = check_stack(FILES, dump(config))
    assert [(where, says in what) for where, what in checked.errors] == [(f"config.yaml: {key}",
                                                                         True)]


@pytest.mark.parametrize("key", ["AUTHENTICATION_TYPE", "DEFAULT_TAG_EXPIRATION",
                                 "TAG_EXPIRATION_OPTIONS", "PREFERRED_URL_SCHEME"])
def test_keys_quay_has_defaults_for_are_not_required(key):
    config = {k: v for k, v in GOOD.items() if k != key}
    if key == "PREFERRED_URL_SCHEME":  # http by default: no TLS pair needed
        assert check_stack(["config.yaml"], dump(config)).ok
    else:
        assert check_stack(FILES, dump(config)).ok


def _read(files):
    return lambda name: files[name]


def test_a_matching_certificate_for_server_hostname_passes():
    pair = tls_pair("quay.example.com")
    assert check_stack(FILES, dump(GOOD), _read(pair)).ok
    assert check_stack(FILES, dump({**GOOD, "SERVER_HOSTNAME": "quay.example.com:8443"}),
                       _read(pair)).ok


def test_a_wildcard_certificate_names_one_label_only():
    pair = tls_pair("*.example.com")
    assert check_stack(FILES, dump(GOOD), _read(pair)).ok
    checked = check_stack(FILES, dump({**GOOD, "SERVER_HOSTNAME": "a.quay.example.com"}),
                          _read(pair))
    assert [w for w, _ in checked.errors] == ["ssl.cert"]


def test_a_certificate_for_another_host_is_an_error_naming_server_hostname():
    checked = check_stack(FILES, dump(GOOD), _read(tls_pair("registry.example.org")))
    assert checked.errors == (("ssl.cert", "is not valid for SERVER_HOSTNAME 'quay.example.com' "
                                           "(its subjectAltName must name it); Quay's "
                                           "config-tool refuses it"),)


def test_a_key_that_does_not_match_the_certificate_is_an_error():
    cert = tls_pair()["ssl.cert"]
    other_key = tls_pair()["ssl.key"]
    checked = check_stack(FILES, dump(GOOD), _read({"ssl.cert": cert, "ssl.key": other_key}))
    assert checked.errors == (("ssl.key", "does not match ssl.cert"),)


@pytest.mark.parametrize("files, where", [
    ({"ssl.cert": b"not a cert", "ssl.key": b"k"}, "ssl.cert"),
    ({"ssl.cert": tls_pair()["ssl.cert"], "ssl.key": b"-----BEGIN PRIVATE KEY-----\nx\n"},
     "ssl.key"),
])
def test_unreadable_tls_files_are_errors(files, where):
    assert [w for w, _ in check_stack(FILES, dump(GOOD), _read(files)).errors] == [where]


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
    config = {k: v for k, v in GOOD.items()
              if k not in ("SECRET_KEY", "DISTRIBUTED_STORAGE_PREFERENCE")}
    checked = check_stack(FILES, dump(config))
    assert checked.ok
    assert [w for w, _ in checked.warnings] == ["config.yaml: SECRET_KEY",
                                                "config.yaml: DISTRIBUTED_STORAGE_PREFERENCE"]


@pytest.mark.parametrize("params, warned", [
    ({"s3_region": "us-east-1", "endpoint_url": "http://minio:9000"}, True),
    ({"s3_region": "us-east-1", "host": "rgw.example.com"}, True),
    ({"endpoint_url": "http://minio:9000"}, False),
    ({"s3_region": "eu-west-1"}, False),
])
def test_s3_region_beside_an_endpoint_is_a_warning(params, warned):
    """Quay's S3Storage ignores endpoint_url when s3_region is set (found when real Quay's
    /health/endtoend reached for AWS from the test bed)."""
    config = dict(GOOD, DISTRIBUTED_STORAGE_CONFIG={"default": ["S3Storage", {
        "s3_access_key": "AKIA1234", "s3_secret_key": "S3Secret!!", "s3_bucket": "b", **params}]})
    checked = check_stack(FILES, dump(config))
    assert checked.ok
    assert [w for w, _ in checked.warnings] == (
        ["config.yaml: DISTRIBUTED_STORAGE_CONFIG.default"] if warned else [])


def test_the_storage_preference_may_come_from_the_container_s_environment():
    config = {k: v for k, v in GOOD.items() if k != "DISTRIBUTED_STORAGE_PREFERENCE"}
    checked = check_stack(FILES, dump(config),
                          environ={"QUAY_DISTRIBUTED_STORAGE_PREFERENCE": "default"})
    assert checked.ok and not checked.warnings


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


def test_a_stack_yaml_error_names_the_line_and_key_never_the_text():
    checked = check_stack(FILES, b"DB_URI: postgresql://q@db/q\nSECRET_KEY: *R0tSuperSecret99\n")
    (where, what), = checked.errors
    assert "R0tSuperSecret99" not in where + what
    assert where == ("config.yaml line 2, column 13 (key SECRET_KEY) (an alias names no anchor "
                     "before it)") and what == "is not valid YAML"


# Quay turns TLS on whenever ssl.key exists (nginx_conf_create.py); with an http scheme or TLS
# ended at the load balancer its own self-checks then follow 301s to port 443: 503 forever.
@pytest.mark.parametrize("change, why", [
    ({"PREFERRED_URL_SCHEME": "http"}, "PREFERRED_URL_SCHEME is http"),
    ({"EXTERNAL_TLS_TERMINATION": True}, "EXTERNAL_TLS_TERMINATION is true"),
])
def test_a_tls_key_that_quay_would_serve_beside_an_http_config_is_refused(change, why):
    checked = check_stack(FILES, dump({**GOOD, **change}), _read({}))
    assert [w for w, _ in checked.errors] == ["ssl.key"]
    what = checked.errors[0][1]
    assert why in what and "503" in what and "remove ssl.key" in what
    assert check_stack(["config.yaml"], dump({**GOOD, **change})).ok


HTTP = {**GOOD, "PREFERRED_URL_SCHEME": "http"}


@pytest.mark.parametrize("config, environ, where, says", [
    ({"DISTRIBUTED_STORAGE_PREFERENCE": ["local_us"]}, {},
     "config.yaml: DISTRIBUTED_STORAGE_PREFERENCE",
     "'local_us', not in DISTRIBUTED_STORAGE_CONFIG (default): Quay writes every upload"),
    ({}, {"QUAY_DISTRIBUTED_STORAGE_PREFERENCE": "default,other"},
     "container.env: QUAY_DISTRIBUTED_STORAGE_PREFERENCE", "on spaces, not commas"),
    ({"DISTRIBUTED_STORAGE_PREFERENCE": "default"}, {},
     "config.yaml: DISTRIBUTED_STORAGE_PREFERENCE", "must be a list"),
])
def test_a_preferred_storage_location_that_is_not_configured_is_refused(config, environ, where, says):
    checked = check_stack(["config.yaml"], dump({**HTTP, **config}), environ=environ)
    assert [w for w, _ in checked.errors] == [where]
    assert says in checked.errors[0][1]


def test_the_environment_s_preference_is_split_on_whitespace_as_quay_does():
    both = {**GOOD, "DISTRIBUTED_STORAGE_CONFIG": {**GOOD["DISTRIBUTED_STORAGE_CONFIG"],
                                                   "other": ["LocalStorage", {}]}}
    checked = check_stack(["config.yaml"], dump({**both, "PREFERRED_URL_SCHEME": "http"}),
                          environ={"QUAY_DISTRIBUTED_STORAGE_PREFERENCE": " other  default\n"})
    assert checked.ok, checked.errors
