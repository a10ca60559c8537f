"""engine.Docker against a fake dockerd behind the real docker SDK (tests/fake_docker_api.py):
what a user would see afterwards with `docker ps -a`, `docker inspect` and `docker events`."""
from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import docker
import pytest
import requests
import structlog.testing

from quay_bootstrap.config import ContainerConfig
from quay_bootstrap.container import MANAGED, Observed, Spec, build_spec, with_entry_point
from quay_bootstrap.engine import Docker, Resume
from quay_bootstrap.errors import ContainerError, Unavailable
from tests.fake_docker_api import (
    IMAGE_ID,
    FakeAPIClient,
    StopAfter,
    api_error,
    daemon_down,
    install,
)

OURS = {MANAGED: "true"}
ASIDE, OLDER_ASIDE = "quay-previous-1700000100", "quay-previous-1700000000"


def quay_spec(entry: str = "registry", **container) -> Spec:
    spec = build_spec(ContainerConfig(**container), IMAGE_ID, "quay.io/projectquay/quay@sha256:ab",
                      Path("/var/lib/quay-bootstrap/stack/versions/v1"), "v1", "v3.9.0")
    return with_entry_point(spec, entry)


def never_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds} s")


@pytest.fixture
def api(monkeypatch) -> FakeAPIClient:
    for name in ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return install(monkeypatch, FakeAPIClient())


@pytest.fixture
def engine(api) -> Docker:
    return Docker(connect_deadline=0, sleep=never_sleep)


def world(api: FakeAPIClient) -> Dict[str, Tuple[str, str, str]]:
    """Each container's name -> (ID, status, StartedAt)."""
    return {name: (found["Id"], found["State"]["Status"], found["State"]["StartedAt"])
            for name in api.names() for found in [api.container(name)]}


def watched(engine: Docker, name: str = "quay") -> List[Tuple[str, Optional[int]]]:
    """What Docker.watch reports from the events streamed so far (one pass of its loop)."""
    seen: List[Tuple[str, Optional[int]]] = []
    engine.watch(name, StopAfter(1), lambda action, code, _: seen.append((action, code)))
    return seen


# --- connecting ---------------------------------------------------------------------------

@pytest.mark.parametrize("saved", [None, "/root/.docker-elsewhere"])
def test_the_client_is_made_over_an_empty_docker_config(api, monkeypatch, saved):
    if saved:
        monkeypatch.setenv("DOCKER_CONFIG", saved)
    engine = Docker(connect_deadline=0, sleep=never_sleep)
    [made] = api.connections
    assert (made.via, made.kwargs) == ("from_env", {"version": "auto", "timeout": 120})
    assert made.config_json == "{}" and made.docker_config != saved
    assert not Path(made.docker_config).exists()  # the temporary folder is gone again
    assert os.environ.get("DOCKER_CONFIG") == saved
    assert engine.client.ping() and engine.where == "unix:///var/run/docker.sock"


def test_a_base_url_is_the_daemon_used_and_named(api):
    engine = Docker("tcp://127.0.0.1:2375", connect_deadline=0, sleep=never_sleep)
    [made] = api.connections
    assert made.via == "DockerClient" and made.config_json == "{}"
    assert made.kwargs == {"base_url": "tcp://127.0.0.1:2375", "version": "auto",
                           "timeout": 120}
    assert engine.where == "tcp://127.0.0.1:2375"


def test_docker_host_names_the_daemon(api, monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "tcp://127.0.0.1:2376")
    assert Docker(connect_deadline=0, sleep=never_sleep).where == "tcp://127.0.0.1:2376"


@pytest.mark.parametrize("method, error", [
    ("connect", daemon_down()),
    ("ping", api_error(500, "Internal Server Error", "/_ping")),
])
def test_a_daemon_that_comes_up_is_waited_for(api, method, error):
    api.fail(method, error, times=2)
    slept: List[float] = []
    engine = Docker(connect_deadline=60, sleep=slept.append)
    assert slept == [0.5, 0.5] and len(api.connections) == 3
    assert engine.find("quay") is None


def test_a_daemon_that_does_not_answer_is_unavailable(api):
    api.fail("connect", daemon_down())
    with pytest.raises(Unavailable) as raised:
        Docker(connect_deadline=0, sleep=never_sleep)
    assert raised.value.where == "unix:///var/run/docker.sock"
    assert "systemctl start docker" in raised.value.hint
    assert isinstance(raised.value.__cause__, docker.errors.DockerException)


def test_a_pull_never_sends_the_credentials_in_the_users_docker_config(api, tmp_path,
                                                                        monkeypatch):
    config = tmp_path / ".docker" / "config.json"
    config.parent.mkdir()
    secret = base64.b64encode(b"someone:secret").decode()
    config.write_text(json.dumps({"auths": {"registry.example.com": {"auth": secret}}}))
    monkeypatch.setenv("HOME", str(tmp_path))
    engine = Docker(connect_deadline=0, sleep=never_sleep)
    # What APIClient.pull sends as X-Registry-Auth when image.py passes no auth_config.
    assert docker.auth.get_config_header(engine.client.api, "registry.example.com") is None


# --- find, create_and_start ---------------------------------------------------------------

def test_find_nothing(engine, api):
    api.add_container(ASIDE, labels=OURS)  # a name that only starts with it is not it
    assert engine.find("quay") is None


@pytest.mark.parametrize("status", ["created", "running", "paused", "restarting", "exited"])
def test_find_what_is_there(engine, api, status):
    labels = {**OURS, "io.quay-bootstrap.stack-version": "v1"}
    container_id = api.add_container("quay", status=status, labels=labels)
    assert engine.find("quay") == Observed(container_id, status, labels, IMAGE_ID)


def test_create_and_start_runs_the_spec(engine, api):
    spec = quay_spec(env={"QUAY_LOG_LEVEL": "debug"}, volumes=["/srv/quay:/datastorage:Z"])
    container_id = engine.create_and_start(spec)
    assert api.names() == {"quay": "running"}
    found = api.container("quay")
    assert found["Id"] == container_id and found["Image"] == spec.image
    assert found["Config"]["Labels"] == spec.labels
    assert found["Config"]["Env"] == ["QUAY_LOG_LEVEL=debug"]
    assert found["Config"]["Cmd"] == ["registry"]  # the image's own entry point
    assert found["Config"]["StopTimeout"] == 90
    assert set(found["Config"]["ExposedPorts"]) == {"8443/tcp", "8080/tcp"}
    host = found["HostConfig"]
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["PortBindings"] == {"8443/tcp": [{"HostIp": "", "HostPort": "443"}],
                                    "8080/tcp": [{"HostIp": "", "HostPort": "80"}]}
    assert host["Binds"] == list(spec.binds)
    assert host["Sysctls"] == {"net.core.somaxconn": "4096"}
    assert not host.get("Privileged")


@pytest.mark.parametrize("entry, container, expect", [
    ("config", {}, {"Cmd": ["config"]}),
    ("registry", {"network_mode": "host"},
     {"NetworkMode": "host", "PortBindings": {}, "Sysctls": None}),
    ("registry", {"ports": ["127.0.0.1:8080:8080/tcp", "5353:53/udp"], "privileged": True},
     {"PortBindings": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}],
                       "53/udp": [{"HostIp": "", "HostPort": "5353"}]},
      "Privileged": True}),
], ids=["entry-point", "host-network", "ports-and-privileged"])
def test_create_and_start_variants(engine, api, entry, container, expect):
    engine.create_and_start(quay_spec(entry, **container))
    found = api.container("quay")
    seen = {**found["HostConfig"], **found["Config"]}
    assert {key: seen.get(key) for key in expect} == expect
    assert found["State"]["Status"] == "running"


@pytest.mark.parametrize("ports, taken, port", [
    (["443:8443"], "container", "0.0.0.0:443"),
    (["443:8443", "80:8080"], "process", "0.0.0.0:80"),
    (["127.0.0.1:8080:8080"], "process", "127.0.0.1:8080"),
], ids=["by-a-container", "by-a-process", "on-one-address"])
def test_a_port_in_use_is_named_and_nothing_is_left(engine, api, ports, taken, port):
    if taken == "container":
        api.add_container("registry-mirror", ports={"5000/tcp": 443})
    else:
        api.host_ports_in_use.add(int(port.rsplit(":", 1)[1]))
    others = api.names()
    with pytest.raises(ContainerError) as raised:
        engine.create_and_start(quay_spec(ports=ports))
    assert raised.value.message.startswith(f"the host port {port} is already in use")
    assert raised.value.where == "container quay" and "container.ports" in raised.value.hint
    assert api.names() == others  # the created container was removed


def test_another_start_failure_is_reported_and_nothing_is_left(engine, api):
    api.fail("start", api_error(500, "OCI runtime create failed: unable to start container "
                                     "process: exec: \"registry\": permission denied"))
    with pytest.raises(ContainerError) as raised:
        engine.create_and_start(quay_spec())
    assert raised.value.message.startswith("Docker could not start the Quay container: OCI ")
    assert api.names() == {}


def test_create_under_a_taken_name_is_dockers_conflict(engine, api):
    theirs = api.add_container("quay")
    with pytest.raises(docker.errors.APIError) as raised:
        engine.create_and_start(quay_spec())
    assert raised.value.status_code == 409 and "already in use" in raised.value.explanation
    assert world(api)["quay"][:2] == (theirs, "running")
    assert api.container("quay")["Config"]["Labels"] == {}


def test_create_from_an_image_docker_does_not_have(engine, api):
    spec = build_spec(ContainerConfig(), "quay.io/projectquay/quay:v3.9.0", "d",
                      Path("/stack/v1"), "v1")
    with pytest.raises(docker.errors.ImageNotFound):
        engine.create_and_start(spec)
    assert api.names() == {}


# --- start, stop, rename, remove ----------------------------------------------------------

def test_start_an_exited_container(engine, api):
    container_id = api.add_container("quay", status="exited", labels=OURS)
    engine.start(container_id)
    assert api.names() == {"quay": "running"}


@pytest.mark.parametrize("stops_in, timeout, exit_code", [
    (20, 30, 0),  # Quay ends within the timeout
    (40, 30, 137),  # SIGKILLed at the timeout
])
def test_stop_gives_quay_the_timeout(engine, api, stops_in, timeout, exit_code):
    container_id = api.add_container("quay", labels=OURS, stops_in=stops_in)
    engine.stop(container_id, timeout)
    found = api.container("quay")
    assert (found["State"]["Status"], found["State"]["ExitCode"]) == ("exited", exit_code)


def test_stop_an_exited_container_changes_nothing(engine, api):
    container_id = api.add_container("quay", status="exited", exit_code=255)
    engine.stop(container_id, 30)
    assert api.container("quay")["State"]["ExitCode"] == 255 and api.take_events() == []


def test_rename(engine, api):
    container_id = api.add_container("quay", labels=OURS)
    engine.rename(container_id, ASIDE)
    assert api.names() == {ASIDE: "running"}


def test_rename_onto_a_taken_name_is_dockers_conflict(engine, api):
    container_id = api.add_container("quay", labels=OURS)
    api.add_container(ASIDE, status="exited", labels=OURS)
    before = world(api)
    with pytest.raises(docker.errors.APIError) as raised:
        engine.rename(container_id, ASIDE)
    assert raised.value.status_code == 409 and world(api) == before


@pytest.mark.parametrize("status", ["running", "restarting", "exited", "created"])
def test_remove_takes_any_container_away(engine, api, status):
    container_id = api.add_container("quay", status=status, labels=OURS)
    engine.remove(container_id)
    assert api.names() == {}


@pytest.mark.parametrize("act", ["start", "stop", "rename", "remove"])
def test_acting_on_a_container_that_is_gone_is_dockers_404(engine, api, act):
    gone = api.add_container("quay")
    engine.remove(gone)
    call = {"start": lambda: engine.start(gone), "stop": lambda: engine.stop(gone, 30),
            "rename": lambda: engine.rename(gone, ASIDE), "remove": lambda: engine.remove(gone)}
    with pytest.raises(docker.errors.NotFound):  # not tolerated: the caller hears of it
        call[act]()


# --- recover ------------------------------------------------------------------------------

@pytest.mark.parametrize("before, after, restored", [
    # Cut off before the new Quay was created: the one set aside is the only Quay.
    ([(ASIDE, "exited", True)], {"quay": ASIDE}, True),
    ([(OLDER_ASIDE, "exited", True), (ASIDE, "exited", True)], {"quay": ASIDE}, True),
    # The new Quay runs: the asides are stale, unless one still runs.
    ([("quay", "running", True), (ASIDE, "exited", True), (OLDER_ASIDE, "exited", True)],
     {"quay": "quay"}, False),
    ([("quay", "running", True), (ASIDE, "running", True)],
     {"quay": "quay", ASIDE: ASIDE}, False),
    # The new Quay exists but does not run (yet): the aside may still be needed.
    ([("quay", "created", True), (ASIDE, "exited", True)], {"quay": "quay", ASIDE: ASIDE}, False),
    ([("quay", "exited", True), (ASIDE, "exited", True)], {"quay": "quay", ASIDE: ASIDE}, False),
    # Only ours are touched, and only names that start with NAME-previous-.
    ([(ASIDE, "exited", False)], {ASIDE: ASIDE}, False),
    ([(OLDER_ASIDE, "exited", True), (ASIDE, "exited", False)],
     {"quay": OLDER_ASIDE, ASIDE: ASIDE}, True),
    ([("other-quay-previous-1", "exited", True)],
     {"other-quay-previous-1": "other-quay-previous-1"}, False),
    ([("quay", "running", True), ("other-quay-previous-1", "exited", True)],
     {"quay": "quay", "other-quay-previous-1": "other-quay-previous-1"}, False),
    ([], {}, False),
], ids=["one-aside", "newest-aside", "stale-asides", "running-aside-kept", "new-created",
        "new-exited", "not-ours", "ours-only", "other-name", "other-name-with-quay", "none"])
def test_recover(engine, api, before, after, restored):
    ids = {name: api.add_container(name, status=status, labels=OURS if ours else {})
           for name, status, ours in before}
    assert engine.recover("quay") is restored
    assert {name: found["Id"] for name in api.names() for found in [api.container(name)]} == \
        {name: ids[was] for name, was in after.items()}


def test_recover_leaves_the_restored_quay_as_it_was(engine, api):
    api.add_container(ASIDE, status="exited", labels=OURS, exit_code=0)
    with structlog.testing.capture_logs() as logs:
        engine.recover("quay")
    assert api.names() == {"quay": "exited"}  # reconcile decides whether to start it
    assert [e["event"] for e in logs] == ["container.restored_aside"]


# --- the restart policy, logs, running, restart_count, age --------------------------------

def test_leave_restarts_to_the_agent(engine, api):
    container_id = api.add_container("quay", labels=OURS)
    before = world(api)
    engine.leave_restarts_to_the_agent(container_id)
    assert api.container("quay")["HostConfig"]["RestartPolicy"]["Name"] == "no"
    assert world(api) == before  # no downtime
    api.crash("quay", 255)
    assert api.names() == {"quay": "exited"} and engine.restart_count(container_id) == 0


def test_an_engine_without_the_update_endpoint_keeps_the_policy_and_says_so(engine, api):
    container_id = api.add_container("quay", labels=OURS)
    before = world(api)
    # podman 4.3's compat API: POST /containers/{id}/update is a plain 404 "Not Found".
    api.fail("update_container", docker.errors.NotFound("404 Client Error: Not Found"))
    with structlog.testing.capture_logs() as logs:
        assert engine.leave_restarts_to_the_agent(container_id) is False
    assert world(api) == before
    assert api.container("quay")["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert [e["event"] for e in logs] == ["container.restart_policy_kept"]
    api.fail("update_container", docker.errors.NotFound("No such container"))
    api.remove_container(container_id, force=True)
    with pytest.raises(docker.errors.NotFound):  # a container that is gone is still an error
        engine.leave_restarts_to_the_agent(container_id)


@pytest.mark.parametrize("printed, tail, text", [
    ("one\ntwo\nthree\n", 5000, "one\ntwo\nthree\n"),
    ("one\ntwo\nthree\n", 2, "two\nthree\n"),
    (b"runmigration.sh \xff\n", 5000, "runmigration.sh \ufffd\n"),
])
def test_logs(engine, api, printed, tail, text):
    container_id = api.add_container("quay", logs=printed)
    assert engine.logs(container_id, tail=tail) == text


def test_logs_of_a_container_that_is_gone(engine, api):
    gone = api.add_container("quay", logs="x\n")
    engine.remove(gone)
    assert engine.logs(gone) == ""


def _crash_and_return(api, container_id):
    api.crash(container_id, 255)


def _crash_into_backoff(api, container_id):
    api.crash(container_id, 255, come_back=False)


def _crash_without_policy(api, container_id):
    api.update_container(container_id, restart_policy={"Name": "no"})
    api.crash(container_id, 255)


def _stop(api, container_id):
    api.stop(container_id)


def _remove(api, container_id):
    api.remove_container(container_id, force=True)


def _restart_by_hand_after_a_crash(api, container_id):
    api.crash(container_id, 255)
    api.restart(container_id)  # a manual (re)start resets Docker's count


@pytest.mark.parametrize("happened, running, running_since, restarts", [
    (None, True, True, 0),
    (_crash_and_return, True, False, 1),
    (_crash_into_backoff, True, False, 1),  # Docker reports a container in back-off Running
    (_crash_without_policy, False, False, 0),
    (_stop, False, False, 0),
    (_remove, False, False, 0),
    (_restart_by_hand_after_a_crash, True, True, 0),
], ids=["running", "restarted-by-policy", "in-back-off", "exited", "stopped", "gone",
        "restarted-by-hand"])
def test_running_and_restart_count(engine, api, happened, running, running_since, restarts):
    container_id = api.add_container("quay", labels=OURS)
    earlier = engine.restart_count(container_id)
    if happened:
        happened(api, container_id)
    assert engine.running(container_id) is running
    assert engine.running(container_id, earlier) is running_since
    assert engine.restart_count(container_id) == restarts


@pytest.mark.parametrize("started, age", [(-90.25, 90.25), (-3600, 3600), (+120, 0.0)],
                         ids=["90s", "an-hour", "clock-skew"])
def test_age(engine, api, started, age):
    container_id = api.add_container("quay", started_at=time.time() + started)
    assert engine.age(container_id) == pytest.approx(age, abs=2)


def test_age_of_a_container_that_is_gone(engine, api):
    gone = api.add_container("quay")
    engine.remove(gone)
    assert engine.age(gone) == 0.0


def test_age_of_a_container_never_started_is_unknown(engine, api):
    assert engine.age(api.add_container("quay", status="created")) == 0.0


# --- restart_quay, stop_quay --------------------------------------------------------------

def _restart_case(status, recreate, exited, echoes, new, *marks):
    return pytest.param(status, recreate, exited, echoes, new, marks=marks,
                        id=f"{status or 'none'}{'-recreate' if recreate else ''}"
                           f"{'-exited' if exited else ''}")


@pytest.mark.parametrize("status, recreate, exited, echoes, new", [
    _restart_case(None, False, False, ("start",), True),  # create
    _restart_case(None, True, True, ("start",), True),
    _restart_case("running", True, False, ("die", "destroy", "start"), True),  # recreate
    _restart_case("exited", True, True, ("destroy", "start"), True),
    _restart_case("restarting", True, True, ("destroy", "start"), True),
    _restart_case("running", False, False, ("die", "start"), False),  # restart
    _restart_case("paused", False, False, ("die", "start"), False),
    _restart_case("exited", False, True, ("start",), False),  # start
    _restart_case("created", False, False, ("start",), False),
    _restart_case("restarting", False, True, ("start",), False),  # back-off: nothing to die
    _restart_case("paused", True, False, ("die", "destroy", "start"), True),  # killed by rm -f
])
def test_restart_quay_acts_and_announces_its_echoes_first(engine, api, status, recreate,
                                                         exited, echoes, new):
    old = api.add_container("quay", status=status, labels=OURS) if status else None
    api.take_events()
    before = world(api)
    announced = []

    def expect(kinds):
        assert world(api) == before, "acted before announcing its echoes"
        announced.append(kinds)

    spec = quay_spec()
    created = engine.restart_quay(spec, recreate, exited, expect)
    assert announced == [echoes]
    assert api.names() == {"quay": "running"}
    found = api.container("quay")
    if new:
        assert created == found["Id"] != old and found["Config"]["Labels"] == spec.labels
    else:
        assert created is None and found["Id"] == old
    assert tuple(action for action, _ in watched(engine)) == echoes  # what Docker echoed


@pytest.mark.parametrize("labels, status, recreate, exited, logged", [
    ({}, "running", True, False, ["container.not_ours"]),  # a stranger took Quay's name
    ({}, "exited", False, True, ["container.not_ours"]),
    (OURS, "running", False, True, ["container.restarted_by_docker"]),
])
def test_restart_quay_leaves_alone(engine, api, labels, status, recreate, exited, logged):
    api.add_container("quay", status=status, labels=labels)
    api.take_events()
    before = world(api)
    with structlog.testing.capture_logs() as logs:
        assert engine.restart_quay(quay_spec(), recreate, exited, never_expected) is None
    assert world(api) == before and api.take_events() == []
    assert [e["event"] for e in logs] == logged


def never_expected(kinds) -> None:
    raise AssertionError(f"expect({kinds}) without an act")


@pytest.mark.parametrize("stop_timeout, exit_code", [(90, 0), (30, 137)])
def test_restart_quay_gives_quay_its_stop_timeout(engine, api, stop_timeout, exit_code):
    api.add_container("quay", labels=OURS, stops_in=60)
    api.take_events()
    engine.restart_quay(quay_spec(stop_timeout=stop_timeout), False, False, lambda kinds: None)
    assert watched(engine) == [("die", exit_code), ("start", None)]


def test_restart_quay_recreate_over_a_taken_port_leaves_no_quay(engine, api):
    api.add_container("quay", labels=OURS)
    api.host_ports_in_use.add(443)  # taken while Quay was down
    with pytest.raises(ContainerError, match="the host port 0.0.0.0:443 is already in use"):
        engine.restart_quay(quay_spec(), True, False, lambda kinds: None)
    assert api.names() == {}  # the old one was removed before the new one was refused


@pytest.mark.parametrize("labels, status, after", [
    (OURS, "running", {"quay": "exited"}),
    (OURS, "exited", {"quay": "exited"}),
    ({}, "running", {"quay": "running"}),  # not ours: left alone
    (None, None, {}),
])
def test_stop_quay(engine, api, labels, status, after):
    if status:
        api.add_container("quay", status=status, labels=labels, stops_in=60)
    engine.stop_quay(quay_spec())  # 90 s to stop: Quay's 60 s are enough
    assert api.names() == after
    assert all(code == 0 for action, code in watched(engine) if action == "die")


# --- watch --------------------------------------------------------------------------------

@pytest.mark.parametrize("legacy", [True, False], ids=["with-status", "action-only"])
def test_watch_reports_the_containers_die_start_and_destroy(engine, api, legacy):
    api.legacy_event_fields = legacy
    quay = api.add_container("quay", labels=OURS)
    aside = api.add_container(ASIDE, labels=OURS)  # matches the filter "quay": not reported
    engine.stop(quay, 30)
    engine.start(quay)
    api.crash("quay", 255)
    engine.remove(aside)
    engine.leave_restarts_to_the_agent(quay)
    engine.remove(quay)
    assert watched(engine) == [("die", 0), ("start", None), ("die", 255), ("start", None),
                               ("die", 137), ("destroy", None)]


def test_watch_reconnects_and_says_so_once(engine, api):
    api.add_container("quay", labels=OURS)
    api.fail("events", requests.exceptions.ConnectionError("Connection refused"), times=2)
    api.crash("quay", 137)
    seen: List[Tuple[str, Optional[int]]] = []
    stop = StopAfter(3)
    with structlog.testing.capture_logs() as logs:
        engine.watch("quay", stop, lambda action, code, _: seen.append((action, code)))
    assert seen == [("die", 137), ("start", None)] and stop.waited == [1.0, 1.0, 1.0]
    assert [e["event"] for e in logs] == ["docker.events_lost", "docker.events_lost_recovered"]


def test_watch_tells_from_since_with_dockers_time_and_resumes_where_a_cut_stream_ended(
        engine, api):
    now = [1_700_000_000.0]
    api.now = lambda: now[0]
    api.add_container("quay", labels=OURS)
    api.crash("quay", 137)  # before `since`: not told
    resume = Resume(now[0] + 0.5)
    now[0] += 1
    api.crash("quay", 1)

    class DockerdRestarts(StopAfter):
        def wait(self, timeout=None):
            now[0] += 1
            api.crash("quay", 2)  # while the stream was away
            return super().wait(timeout)

    seen: List[Tuple[str, Optional[int], Optional[float]]] = []
    engine.watch("quay", DockerdRestarts(2), lambda *told: seen.append(told), resume)
    start = 1_700_000_001.0
    assert seen == [("die", 1, start), ("start", None, start),  # none told twice
                    ("die", 2, start + 1), ("start", None, start + 1)]
    assert [call["since"] for name, call in api.calls if name == "events"] == [
        "1700000000.500000000", "1700000001.000000000"]


def test_watch_ends_when_told_to(engine, api):
    engine.watch("quay", StopAfter(0), never_expected)
    assert [name for name, _ in api.calls if name == "events"] == []


# --- the fake itself ----------------------------------------------------------------------

def test_a_call_the_fake_does_not_model_fails_naming_it(engine):
    with pytest.raises(AssertionError, match=r"client\.api\.kill is not modelled"):
        engine.client.api.kill("quay")


def test_a_call_the_sdk_would_refuse_fails_the_same_way(engine, api):
    api.add_container("quay")
    with pytest.raises(TypeError):
        engine.client.api.stop("quay", t=30)
    with pytest.raises(docker.errors.NullResource):
        engine.client.api.inspect_container(None)
