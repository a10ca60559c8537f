"""The real agent against a store that lies about sizes (tests/integration/lying_store.py: S3 and
the GCS JSON API over real HTTP): an object listed with a few bytes and served with 200 MiB, or
with fewer bytes than listed, is refused naming its key; the live stack and a running Quay are
untouched; and the agent's memory never holds the lie.

Peak RSS is the kernel's high-water mark of the agent's own process (ru_maxrss from wait4), so a
spike between two samples cannot hide. The agent peaks at about 70 MiB on a good fetch
(BENCHMARKS.md: start-up alone is 69 MiB); the lie is 200 MiB, so an agent that read it into
memory would peak above 270 MiB. The limit, 150 MiB, sits halfway: far from both, so neither
the agent's normal growth nor a busy machine makes it flaky, and a read of even 40% of the lie
fails it. Each test also holds the lying run to its own good run's peak plus 24 MiB.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Tuple

import pytest

from quay_bootstrap.errors import SourceError
from tests.integration.conftest import PREFIX, Agent, Backend, Node
from tests.integration.lying_store import LyingStore
from tests.integration.stores_fixtures import isolate_aws_env
from tests.testbed.stacks import sample_stack

BUCKET = "lying-bucket"
LIAR = "robots.txt"
LIE_BYTES = 200 << 20
PEAK_LIMIT_MIB = 150
# A good fetch validates the stack (YAML, the TLS pair) and the lying one never gets that far;
# the allowance is for the allocator and thread stacks, not for any part of the lie.
OVER_GOOD_RUN_MIB = 24
# What the store may get onto loopback socket buffers (send and receive, a few MiB each) before
# the agent's hang-up reaches it, per download; 3 downloads of the lie.
SOCKET_SLACK = 16 << 20


@pytest.fixture
def lying_store():
    with LyingStore(BUCKET, extra=LIE_BYTES) as store:
        yield store


@pytest.fixture
def lying_s3(lying_store, monkeypatch, tmp_path) -> Backend:
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}
    isolate_aws_env(monkeypatch, tmp_path, keys)
    return Backend("s3", f"s3://{BUCKET}/{PREFIX}",
                   lambda key, data, **_: lying_store.put(f"{PREFIX}/{key}", data),
                   lambda key: lying_store.delete(f"{PREFIX}/{key}"),
                   {"endpoint_url": lying_store.url, "region": "us-east-1"}, keys)


@pytest.fixture
def lying_gcs(lying_store, monkeypatch) -> Backend:
    """The GCS client pointed at the liar the way the bed's GCS fixtures point it at the
    emulators: STORAGE_EMULATOR_HOST (anonymous credentials)."""
    monkeypatch.delenv("API_ENDPOINT_OVERRIDE", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", lying_store.url)
    return Backend("gcs", f"gs://{BUCKET}/{PREFIX}",
                   lambda key, data, **_: lying_store.put(f"{PREFIX}/{key}", data),
                   lambda key: lying_store.delete(f"{PREFIX}/{key}"),
                   env={"STORAGE_EMULATOR_HOST": lying_store.url})


@pytest.fixture(params=["s3", "gcs"])
def lying_backend(request) -> Backend:
    return request.getfixturevalue(f"lying_{request.param}")


# Forks and execs the agent, then reports the agent's own rusage. Not Popen from this process:
# exec records the old address space's high-water mark in ru_maxrss, and with vfork that is
# pytest's (about 1 GiB late in a full run); this wrapper's is a few MiB. The alarm survives the
# exec, so a hung agent is killed and fails the test rather than the run.
_WRAPPER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    signal.alarm(int(sys.argv[1]))
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\n@@maxrss %d\\n" % usage.ru_maxrss)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def measured(agent: Agent, *args: str, timeout: int = 180) -> Tuple[int, str, str, float]:
    """`quay-bootstrap ARGS` as its own process, as systemd runs it: (exit code, stdout,
    stderr, peak RSS in MiB). wait4 in a small parent gives the rusage of exactly that process,
    so nothing else this test process ran is counted."""
    argv = [sys.executable, "-c", _WRAPPER, str(timeout), sys.executable, "-m", "quay_bootstrap",
            "--config", str(agent.config_path), *args, "--log-level", "info",
            "--log-format", "json"]
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **agent.env},
                          timeout=timeout + 30)
    err, _, rss = done.stderr.rpartition("\n@@maxrss ")
    return done.returncode, done.stdout, err, int(rss) / 1024


def applied_measured(agent: Agent, backend: Backend) -> Tuple[Tuple, str, float]:
    """A good stack fetched by the agent as its own process: (live, current's target, peak)."""
    backend.upload(sample_stack())
    agent.write_config(backend)
    code, _, err, peak = measured(agent, "fetch")
    assert code == 0, err
    return agent.live(), os.readlink(agent.stack_dir / "current"), peak


def assert_untouched(agent: Agent, live: Tuple, link: str) -> None:
    assert agent.live() == live  # the same version and every file byte for byte
    assert os.readlink(agent.stack_dir / "current") == link
    assert agent.staging() == []


@pytest.mark.parametrize("how", ["longer", "longer-chunked"])
def test_a_store_sending_more_than_it_listed_is_refused_in_bounded_memory(
        agent, lying_backend, lying_store, how):
    """"longer" announces its 200 MiB in Content-Length; "longer-chunked" has no length to
    check up front, so only the bounded read stops it."""
    live, link, good_peak = applied_measured(agent, lying_backend)
    lying_backend.put(LIAR, b"User-agent: *\nDisallow: /new\n")  # listed: 29 bytes
    lying_store.lie(f"{PREFIX}/{LIAR}", how)
    lying_store.gets.clear()
    code, _, err, peak = measured(agent, "fetch")
    assert code == SourceError.exit_code, err
    assert f"refusing the whole stack: '{LIAR}' did not match the store's listing" in err
    assert "the store sent more than the 29 bytes it listed" in err or \
        f"the store sent {LIE_BYTES} bytes, it listed 29" in err, err
    assert_untouched(agent, live, link)
    downloads = lying_store.gets.count(f"{PREFIX}/{LIAR}")
    sent = lying_store.sent.get(f"{PREFIX}/{LIAR}", 0)
    print(f"\npeak RSS ({lying_backend.kind}, {how}): good fetch {good_peak:.1f} MiB, lying "
          f"fetch {peak:.1f} MiB; the store got {sent} bytes of the lie out in {downloads} "
          "downloads")
    assert peak < PEAK_LIMIT_MIB, f"the agent peaked at {peak:.1f} MiB"
    assert peak < good_peak + OVER_GOOD_RUN_MIB, (peak, good_peak)
    assert downloads == 3  # a mismatch is downloaded again, up to 3 times, each one refused
    assert sent < downloads * SOCKET_SLACK  # the agent hung up; it never drained the lie


def test_a_store_sending_less_than_it_listed_is_refused(agent, lying_backend, lying_store):
    live, link, _ = applied_measured(agent, lying_backend)
    lying_backend.put(LIAR, b"User-agent: *\n" + b"#" * 4000 + b"\n")  # listed: 4015 bytes
    lying_store.lie(f"{PREFIX}/{LIAR}", "shorter")  # sends 100 of them, Content-Length 100
    code, _, err, _ = measured(agent, "fetch")
    assert code == SourceError.exit_code, err
    assert f"refusing the whole stack: '{LIAR}' did not match the store's listing" in err
    assert "got 100 bytes, the store listed 4015" in err
    assert_untouched(agent, live, link)


def test_an_endless_listing_stops_past_max_files(agent, lying_backend, lying_store):
    """A store whose listing never ends (or a prefix naming a bucket of millions of objects):
    the agent asks for pages only until it holds more than stack.max_files keys."""
    live, link, _ = applied_measured(agent, lying_backend)
    lying_store.endless = True
    lying_store.pages = 0
    agent.write_config(lying_backend, max_files=2500)
    code, _, err, peak = measured(agent, "fetch", timeout=60)
    assert code == SourceError.exit_code, err
    assert "the stack has more than stack.max_files (2500) files; the listing stopped there" in err
    assert lying_store.pages == 3  # 3,000 keys > 2,500
    assert peak < PEAK_LIMIT_MIB
    assert_untouched(agent, live, link)


def test_the_store_telling_the_truth_again_is_applied(agent, lying_s3, lying_store):
    """The refusal holds nothing back: once the object is what the store lists, it goes live."""
    applied_measured(agent, lying_s3)
    lying_s3.put(LIAR, b"User-agent: *\nDisallow: /new\n")
    lying_store.lie(f"{PREFIX}/{LIAR}", "longer-chunked")
    assert measured(agent, "fetch")[0] == SourceError.exit_code
    lying_store.lie(f"{PREFIX}/{LIAR}", None)
    code, _, err, _ = measured(agent, "fetch")
    assert code == 0, err
    assert agent.live()[1][LIAR] == b"User-agent: *\nDisallow: /new\n"


def test_a_lying_store_leaves_the_running_quay_alone(agent, lying_s3, lying_store, docker_client,
                                                     testbed, fake_images, tmp_path, monkeypatch):
    """`run --once` on a node whose fake Quay runs healthy on the good stack: the lie is refused
    before Quay is touched, so the same container keeps running on the same stack."""
    lying_s3.upload(sample_stack())
    node = Node(agent, lying_s3, docker_client, testbed, fake_images, tmp_path, monkeypatch)
    try:
        node.configure()
        code, out, err = agent.run("run", "--once")
        assert code == 0, out + err
        container = node.found()
        started = container.attrs["State"]["StartedAt"]
        live, link = agent.live(), os.readlink(agent.stack_dir / "current")
        lying_s3.put(LIAR, b"User-agent: *\nDisallow: /new\n")
        lying_store.lie(f"{PREFIX}/{LIAR}", "longer-chunked")
        code, out, err, peak = measured(agent, "run", "--once")
        assert code == SourceError.exit_code, out + err
        assert f"'{LIAR}' did not match the store's listing" in err
        print(f"\npeak RSS (run --once, s3, longer-chunked): {peak:.1f} MiB")
        assert peak < PEAK_LIMIT_MIB, f"the agent peaked at {peak:.1f} MiB"
        after = node.found()
        assert after.id == container.id and after.status == "running"
        assert after.attrs["State"]["StartedAt"] == started
        assert len(node.starts()) == 1
        assert_untouched(agent, live, link)
        assert after.labels["io.quay-bootstrap.stack-version"] == live[0]
    finally:
        node.cleanup()
