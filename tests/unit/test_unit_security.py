"""What ships beside the package, for security: the systemd unit's sandbox (exposure 4.0 or less
by `systemd-analyze security`, and still everything the agent needs), and user-data examples
that carry no secret."""
from __future__ import annotations

import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Set

import pytest
import yaml

from quay_bootstrap.config import ReportConfig, StackConfig

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "quay-bootstrap.service"
MAX_EXPOSURE = 4.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian: the systemd package, which "
           "tests/testbed/install-debian.sh installs)")


def service() -> Dict[str, List[str]]:
    """[Service] as key -> every value in file order (SystemCallFilter= comes more than once)."""
    section, found = None, {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def one(key: str) -> str:
    values = service().get(key, [])
    assert len(values) == 1, f"{key}= should be set once, found {values}"
    return values[0]


def words(key: str) -> Set[str]:
    return {word for value in service().get(key, []) for word in value.split()}


def size(text: str) -> int:
    """A systemd size (1024-based suffixes)."""
    match = re.fullmatch(r"(\d+)([KMGT]?)", text)
    assert match, f"not a size: {text!r}"
    return int(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " ")


@needs_analyze
def test_exposure_is_at_most_4():
    done = subprocess.run(["systemd-analyze", "security", "--offline=true",
                           f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
                          capture_output=True, text=True)
    found = re.search(r"Overall exposure level for quay-bootstrap\.service: (\d+\.\d+)", done.stdout)
    assert found, done.stdout + done.stderr
    exposed = "\n".join(line for line in done.stdout.splitlines() if line.startswith("✗"))
    assert float(found.group(1)) <= MAX_EXPOSURE, f"exposure {found.group(1)}:\n{exposed}"
    assert done.returncode == 0, done.stdout + done.stderr  # --threshold agrees


def test_it_runs_as_root_with_only_the_capabilities_it_uses():
    # Root for the Docker socket; chown for stack.owner; DAC_OVERRIDE to keep working in the
    # folders given to 1001 (see the unit). Widening this set should be a decision.
    assert "User" not in service() and "DynamicUser" not in service()
    assert words("CapabilityBoundingSet") == {"CAP_CHOWN", "CAP_DAC_OVERRIDE"}
    assert "AmbientCapabilities" not in service()
    assert one("NoNewPrivileges") == "yes"
    assert "PrivateUsers" not in service()  # uid 1001 would be unmapped: chown fails


def test_it_may_write_its_folders_and_the_docker_socket_and_nothing_else():
    assert one("ProtectSystem") == "strict"
    writable = one("ReadWritePaths").split()
    for socket in ("/run/docker.sock", "/var/run/docker.sock"):
        assert f"-{socket}" in writable  # "-": either may be missing
    folders = [Path(p) for p in writable if not p.startswith("-")]
    defaults = [StackConfig.model_fields["dir"].default,
                ReportConfig.model_fields["state_file"].default.parent]
    for default in defaults:
        assert any(default == f or f in default.parents for f in folders), default
    assert one("StateDirectory") == "quay-bootstrap" and one("RuntimeDirectory") == "quay-bootstrap"


def test_it_reads_its_config_and_the_machine_id():
    hidden = words("InaccessiblePaths") | words("TemporaryFileSystem")
    for path in ("/etc/quay-bootstrap", "/etc/machine-id", "/etc"):
        assert path not in hidden
    assert one("EnvironmentFile") == "-/etc/quay-bootstrap/environment"


def test_it_reaches_docker_systemd_the_store_and_the_metadata_service():
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= words("RestrictAddressFamilies")
    assert "PrivateNetwork" not in service() and "IPAddressDeny" not in service()
    assert one("Type") == "notify" and one("NotifyAccess") == "main"
    assert one("WatchdogSec")


def test_files_it_creates_are_private_unless_it_says_otherwise():
    assert one("UMask") == "0077"


def test_limits_leave_room_for_a_full_stack_fetch():
    # A fetch holds up to stack.max_bytes, about twice; the agent itself runs in under 100 MiB.
    max_bytes = StackConfig.model_fields["max_bytes"].default
    assert size(one("MemoryMax")) >= 2 * max_bytes + 256 * 1024 ** 2
    most = [m.le for m in StackConfig.model_fields["concurrency"].metadata if hasattr(m, "le")]
    assert int(one("TasksMax")) >= most[0] + 64


@lru_cache(maxsize=None)
def syscalls(group: str) -> frozenset:
    """The system calls of a @group, nested groups expanded, as this systemd knows them."""
    out = subprocess.run(["systemd-analyze", "syscall-filter", group], capture_output=True,
                         text=True, check=True).stdout
    names: Set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if item and not item.startswith("#"):
            names |= syscalls(item) if item.startswith("@") else {item}
    return frozenset(names)


def allowed_syscalls() -> Set[str]:
    """SystemCallFilter= as systemd applies it: the first line is the allow list, later lines
    add to it, or take away with ~."""
    allowed: Set[str] = set()
    for n, value in enumerate(service()["SystemCallFilter"]):
        deny = value.startswith("~")
        assert n > 0 or not deny, "the first SystemCallFilter= must be an allow list"
        names: Set[str] = set()
        for item in value.lstrip("~").split():
            names |= syscalls(item) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    return allowed


@needs_analyze
def test_the_system_call_filter_keeps_what_the_agent_calls():
    allowed = allowed_syscalls()
    # The stack given to Quay's user; the store's files, links, renames and syncfs; threads;
    # the on_unhealthy child; sockets; libffi's memfd under MemoryDenyWriteExecute.
    needed = {"chown", "fchown", "fchownat", "fchmod", "openat", "mkdirat", "renameat2",
              "symlinkat", "linkat", "unlinkat", "utimensat", "flock", "fsync", "syncfs",
              "clone", "clone3", "execve", "wait4", "futex", "socket", "connect", "bind",
              "listen", "accept4", "sendmsg", "recvfrom", "epoll_wait", "poll", "getrandom",
              "memfd_create", "ioctl"}
    assert needed <= allowed, sorted(needed - allowed)
    forbidden = {"setuid", "setresuid", "setgroups", "capset", "mount", "umount2", "pivot_root",
                 "chroot", "sethostname", "settimeofday", "clock_settime", "init_module",
                 "reboot", "swapon", "setrlimit", "sched_setscheduler", "bpf", "ptrace",
                 "kexec_load", "acct"}
    assert not forbidden & allowed, sorted(forbidden & allowed)


# --- user-data without secrets -------------------------------------------------------------
# The metadata service serves user-data to any process on the machine that asks (containers
# included) for the instance's whole life: an example must name where a secret lives, never
# hold one.
SECRET_WORD = r"(?:secret|passw(?:or)?d|token|access[_-]?key|private[_-]?key|api[_-]?key|credential)"
ASSIGNMENT = re.compile(rf"(?i)(?P<key>[A-Za-z0-9_.-]*{SECRET_WORD}[A-Za-z0-9_.-]*)[\"']?[ \t]*"
                        rf"[:=][ \t]*[\"']?(?P<value>[^\s\"',}}\]]*)")
# Where a secret lives: a file, a shell variable, a parameter or a secret manager's name.
REFERENCE = re.compile(r"^(/|\$\{?[A-Za-z_]|ssm:|gcp:|projects/|arn:aws:secretsmanager:)")
NOT_A_SECRET = {"", "null", "none", "~", "true", "false", "|", ">"}
INLINE = [(re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
          (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key id"),
          (re.compile(r"://[^/\s:@]+:[^/\s@]+@"), "a password in a URL")]
SECRET_FILE = re.compile(rf"(?i){SECRET_WORD}|\.key$|\.pem$")


def inline_secrets(text: str) -> List[str]:
    """Each secret `text` (a cloud-config) carries itself, as "line N: what"."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        found += [f"line {number}: {what}" for pattern, what in INLINE if pattern.search(line)]
        for match in ASSIGNMENT.finditer(line):
            value = match.group("value")
            if value.lower() not in NOT_A_SECRET and not REFERENCE.match(value):
                found.append(f"line {number}: {match.group('key')} set inline")
    doc = yaml.safe_load(text) or {}
    for item in doc.get("write_files", []):
        program = int(str(item.get("permissions", "0644")), 8) & 0o111  # fetches, holds none
        if SECRET_FILE.search(item["path"]) and not program and str(item.get("content", "")).strip():
            found.append(f"{item['path']} written with its content")
    return found


CLOUD_CONFIGS = sorted((REPO / "cloud-config").glob("*.yaml"))


@pytest.mark.parametrize("path", CLOUD_CONFIGS, ids=lambda p: p.name)
def test_no_cloud_config_example_carries_a_secret(path):
    found = inline_secrets(path.read_text())
    assert not found, (f"{path.name}: {'; '.join(found)}. Fetch the secret at boot with the "
                       "machine's identity into a root-only file, as s3-compatible.yaml does")


INLINE_CASES = {
    "write_files:\n  - path: /etc/quay-bootstrap/environment\n    content: |\n"
    "      AWS_ACCESS_KEY_ID=quay-bootstrap\n      AWS_SECRET_ACCESS_KEY=change-me\n":
        ["line 4: AWS_ACCESS_KEY_ID set inline", "line 5: AWS_SECRET_ACCESS_KEY set inline"],
    "write_files:\n  - path: /etc/quay-bootstrap/registry-password\n    content: |\n"
    "      change-me\n": ["/etc/quay-bootstrap/registry-password written with its content"],
    "write_files:\n  - path: /etc/quay/tls.key\n    permissions: '0600'\n    content: x\n":
        ["/etc/quay/tls.key written with its content"],
    "users:\n  - {name: ops, plain_text_passwd: hunter2}\n": ["line 2: plain_text_passwd set inline"],
    "x: |\n  [default]\n  aws_secret_access_key = abc\n": ["line 3: aws_secret_access_key set inline"],
    "x: \"auth: {username: robot, password: hunter2}\"\n": ["line 1: password set inline"],
    "x: |\n  -----BEGIN OPENSSH PRIVATE KEY-----\n": ["line 2: a private key"],
    "x: AKIAIOSFODNN7EXAMPLE\n": ["line 1: an AWS access key id"],
    "x: [pip, install, --index-url, 'https://ci:s3cret@pypi.example.com/simple']\n":
        ["line 1: a password in a URL"],
    # References to where the secret lives are the way to do it:
    "x: {password_file: /etc/quay-bootstrap/registry-password, ecr: true}\n": [],
    "x: |\n  ENV = {\"AWS_SECRET_ACCESS_KEY\": \"ssm:/quay/rgw/secret-access-key\"}\n"
    "  token: $TOKEN\n": [],
    "x: \"api_key: gcp:projects/p/secrets/s/versions/latest\"\n": [],
}


@pytest.mark.parametrize("text", list(INLINE_CASES), ids=range(len(INLINE_CASES)))
def test_the_scan_finds_inline_secrets_and_lets_references_pass(text):
    assert inline_secrets(text) == INLINE_CASES[text]
