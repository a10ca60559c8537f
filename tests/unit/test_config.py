"""The agent config: defaults, durations and sizes, and every problem reported with its key path."""
import pytest
from pydantic import ValidationError

from quay_bootstrap.config import config_path, load_config, parse_config, parse_duration, parse_size
from quay_bootstrap.errors import EXIT_CONFIG, ConfigError

MINIMAL = "stack: {source: s3://bucket/conf/stack}\nimage: {reference: quay.io/projectquay/quay:v3.9.0}\n"


def test_minimal_config_gets_documented_defaults():
    cfg = parse_config(MINIMAL)
    assert str(cfg.stack.dir) == "/var/lib/quay-bootstrap/stack"
    assert cfg.stack.owner == "1001:0" and cfg.stack.uid_gid == (1001, 0)
    assert cfg.stack.refresh_interval == 60
    assert (cfg.stack.max_files, cfg.stack.max_bytes) == (10_000, 64 * 1024 * 1024)
    assert cfg.container.name == "quay"
    assert cfg.container.ports == ["443:8443", "80:8080"]
    assert cfg.health.url is None  # follows the stack and the ports: container.health_url
    assert cfg.health.tls_verify is False
    assert cfg.health.timeout > 2 + 2 + 3 + 5  # above Quay's own worst case
    assert cfg.health.shared_services == ["database", "redis", "storage", "auth",
                                          "preferred_storage"]
    assert cfg.container.sysctls is None  # somaxconn with bridge networking only
    assert cfg.report.listen == "127.0.0.1:9101"
    assert cfg.report.autoscaling == "auto"
    assert cfg.rollout.max_unavailable == 1
    assert cfg.logging.format == "auto"


def test_config_is_frozen():
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        cfg.stack.max_files = 3


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("250ms", 0.25), ("90", 90),
    (45, 45), (0, 0), ("2d", 172800),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5x", "", "m5", "-3s", True, None, "1h 30m", [1]])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("text,size", [("64MiB", 64 * 1024 * 1024), ("500KB", 500_000),
                                       (1024, 1024), ("10 B", 10), ("1GiB", 1024 ** 3)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_every_problem_is_reported_with_its_key_path():
    text = """
stack: {source: ftp://x, max_byts: 5, refresh_interval: 5x, owner: quay}
image: {reference: quay.io/projectquay/quay:v3.9.0, auth: {username: bob}}
container: {ports: ["abc"]}
helth: {}
report: {on_unhealthy: "systemctl poweroff", listen: nowhere}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "/etc/quay-bootstrap/config.yaml")
    err = caught.value
    assert err.exit_code == EXIT_CONFIG
    problems = dict(err.problems)
    assert "expected one of s3://..., gs://..., file://..." in problems["stack.source"]
    assert problems["stack.max_byts"] == "unknown key; did you mean 'max_bytes'?"
    assert "not a duration" in problems["stack.refresh_interval"]
    assert "1001:0" in problems["stack.owner"]
    assert "username and password_file go together" in problems["image.auth"]
    assert "HOST:CONTAINER" in problems["container.ports.0"]
    assert problems["helth"] == "unknown key; did you mean 'health'?"
    assert "without a shell" in problems["report.on_unhealthy"]
    assert "HOST:PORT" in problems["report.listen"]
    text = str(err)
    assert "/etc/quay-bootstrap/config.yaml" in text and "stack.max_byts" in text


def test_missing_sections_are_named():
    with pytest.raises(ConfigError) as caught:
        parse_config("logging: {level: debug}\n")
    assert dict(caught.value.problems) == {"stack": "required key is missing",
                                           "image": "required key is missing"}


@pytest.mark.parametrize("text,expect", [
    ("stack: [\n", "not valid YAML"),
    ("- a\n- b\n", "must be a YAML mapping"),
    ("", "must be a YAML mapping"),
])
def test_not_a_yaml_mapping(text, expect):
    with pytest.raises(ConfigError, match=expect) as caught:
        parse_config(text)
    assert caught.value.exit_code == EXIT_CONFIG


def test_yaml_error_names_the_line():
    with pytest.raises(ConfigError) as caught:
        parse_config("stack:\n  source: s3://b/p\nimage: {reference: [\n", "cfg.yaml")
    assert "cfg.yaml line" in str(caught.value)


def test_host_network_needs_no_other_change_but_explicit_net_sysctls_are_refused():
    cfg = parse_config(MINIMAL + "container: {network_mode: host}\n")
    assert cfg.container.network_mode == "host" and cfg.container.sysctls is None
    with pytest.raises(ConfigError, match="net.\\* sysctls"):
        parse_config(MINIMAL + "container: {network_mode: host, sysctls: {net.core.somaxconn: 1}}\n")


def test_yaml_scalars_become_docker_strings():
    cfg = parse_config(MINIMAL + "container: {env: {WORKERS: 4, DEBUG: true}}\n")
    assert cfg.container.env == {"WORKERS": "4", "DEBUG": "true"}


def test_missing_file_says_how_to_point_at_one(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(str(tmp_path / "nope.yaml"))
    assert "does not exist" in str(caught.value) and "--config" in str(caught.value)


def test_config_path_precedence():
    assert config_path("/a", {"QUAY_BOOTSTRAP_CONFIG": "/b"}) == "/a"
    assert config_path(None, {"QUAY_BOOTSTRAP_CONFIG": "/b"}) == "/b"
    assert config_path(None, {}) == "/etc/quay-bootstrap/config.yaml"


@pytest.mark.parametrize("section,key", [("health", "interval"), ("health", "timeout"),
                                         ("restart", "backoff_initial"), ("restart", "window")])
def test_zero_durations_that_would_spin_or_never_wait_are_refused(section, key):
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + f"{section}: {{{key}: 0}}\n")
    assert f"{section}.{key}" in dict(caught.value.problems)


def test_the_lock_must_name_an_object():
    text = ("stack: {source: s3://bucket/conf/stack}\n"
            "image: {reference: quay.io/projectquay/quay:v3.9.0, lock: s3://bucket}\n")
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert "names a bucket" in dict(caught.value.problems)["image.lock"]


@pytest.mark.parametrize("text", ["inf", "nan", "-inf", "1e999"])
def test_durations_must_be_finite(text):
    with pytest.raises(ValueError, match="finite"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["10000000000", "367d", 1e10])
def test_durations_longer_than_a_year_are_refused(text):
    """socket.settimeout and Event.wait overflow near 9.2e9 s: every probe would fail."""
    with pytest.raises(ValueError, match="longer than a year"):
        parse_duration(text)
    with pytest.raises(ConfigError, match="health.timeout"):
        parse_config(MINIMAL + f"health: {{timeout: {text}}}\n")


@pytest.mark.parametrize("rollout, ok", [
    ("{lease_ttl: 10m}", True),
    ("{lease_ttl: 0}", False),
    ("{lease_ttl: inf}", False),
    ("{lease_ttl: 5m}", False),  # not above stop_timeout 90s + start_period 300s
    ("{lease_ttl: 391s}", True),
])
def test_lease_ttl_outlives_a_replacement(rollout, ok):
    text = MINIMAL + f"rollout: {rollout}\n"
    if ok:
        assert parse_config(text).rollout.lease_ttl > 390
    else:
        with pytest.raises(ConfigError) as caught:
            parse_config(text)
        assert "lease_ttl" in str(caught.value)


def test_the_node_id_is_the_instance_id_else_the_machine_id(tmp_path):
    from quay_bootstrap.aws import node_id

    machine = tmp_path / "machine-id"
    machine.write_text("0123456789abcdef\n")
    off_aws = parse_config(MINIMAL + "report: {autoscaling: false}\n")
    # autoscaling false: the metadata service is never asked, the machine id names the node.
    assert node_id(off_aws, environ={}, machine_id=str(machine)) == "0123456789abcdef:quay"


def test_a_yaml_error_names_the_line_and_key_never_the_text():
    secret = "R0tSuperSecret99"
    with pytest.raises(ConfigError) as caught:
        parse_config("stack:\n  source: s3://b/p\nimage: {reference: q}\n"
                     f"report:\n  on_unhealthy: *{secret}\n", "cfg.yaml")
    text = str(caught.value)
    assert secret not in text and "line 5" in text and "on_unhealthy" in text


@pytest.mark.parametrize("listen, ok", [
    ("127.0.0.1:9101", True), ("0.0.0.0:9101", True), ("[::1]:9101", True),
    ("localhost:9101", True), (":9101", False), ("0:9101", False), ("127.0.0.1:99999", False),
    ("9101", False), ("999.1.1.1:9101", False), ("[:]:9101", False), ("[::]:9101", True),
])
def test_listen_takes_an_explicit_host_and_port(listen, ok):
    text = MINIMAL + f'report: {{listen: "{listen}"}}\n'
    if ok:
        assert parse_config(text).report.listen == listen
    else:
        with pytest.raises(ConfigError, match="explicit host"):
            parse_config(text)


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/health/instance", "http://[::1",
                                 "http:///health/instance", "http://127.0.0.1:0/health/instance"])
def test_a_health_url_that_could_not_be_probed_is_refused_when_loaded(url):
    with pytest.raises(ConfigError, match="health.url"):
        parse_config(MINIMAL + f'health: {{url: "{url}"}}\n')


def test_the_endpoint_listens_on_ipv6_loopback():
    import urllib.request

    from quay_bootstrap.endpoint import Endpoint
    from quay_bootstrap.status import Board

    endpoint = Endpoint(Board(), "[::1]:0").start()
    try:
        port = endpoint.address.rsplit(":", 1)[1]
        with urllib.request.urlopen(f"http://[::1]:{port}/healthz", timeout=2) as answer:
            assert answer.status == 200
    finally:
        endpoint.stop()


def test_quayentry_in_the_container_env_is_refused_naming_the_key():
    # quay-entrypoint.sh: QUAYENTRY wins over the command, so registry-nomigrate would be lost.
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + "container: {env: {QUAYENTRY: registry}}\n")
    assert "container.env" in str(caught.value) and "QUAYENTRY" in str(caught.value)
    assert "registry-nomigrate" in str(caught.value)


@pytest.mark.parametrize("services, ok", [
    ("nginx,gunicorn-web,gunicorn-registry", True),
    (" gunicorn-registry , nginx,gunicorn-web,servicekey,gcworker", True),
    ("", True),  # empty: every default service (supervisord_conf_create.py)
    ("nginx,gunicorn-web", False),
    ("gcworker", False),
])
def test_quay_services_must_keep_what_health_instance_needs(services, ok):
    text = MINIMAL + f"container: {{env: {{QUAY_SERVICES: '{services}'}}}}\n"
    if ok:
        assert parse_config(text).container.env["QUAY_SERVICES"] == services
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert "QUAY_SERVICES leaves out" in str(caught.value) and "gunicorn-registry" in str(caught.value)


def test_a_storage_preference_with_commas_in_the_container_env_is_refused():
    with pytest.raises(ConfigError, match="spaces, not commas"):
        parse_config(MINIMAL + "container: {env: {QUAY_DISTRIBUTED_STORAGE_PREFERENCE: 'a,b'}}\n")
    cfg = parse_config(MINIMAL + "container: {env: {QUAY_DISTRIBUTED_STORAGE_PREFERENCE: 'a b'}}\n")
    assert cfg.container.env["QUAY_DISTRIBUTED_STORAGE_PREFERENCE"] == "a b"
