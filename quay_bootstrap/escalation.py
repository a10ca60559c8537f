"""Marking this node unhealthy: the targets told when restarts did not help, built from config."""
from __future__ import annotations

import os
import subprocess
import threading
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence

import structlog

log = structlog.get_logger(__name__)


class Target(Protocol):
    """Something that takes a node out of service (and may put it back).

    `mark` returns True when the target acted (the Auto Scaling group recorded Unhealthy), False
    when it had nothing to do here (not in a group); `clear` undoes what can be undone.
    """

    name: str

    def mark(self, reason: str) -> bool: ...

    def clear(self) -> None: ...


class AutoScalingTarget:
    """The instance's Auto Scaling group: Unhealthy makes the group replace the instance, so
    there is nothing to clear."""

    name = "autoscaling"

    def __init__(self, mode, region: Optional[str] = None, autoscaling=None) -> None:
        if autoscaling is None:
            from quay_bootstrap.aws import AutoScaling

            autoscaling = AutoScaling(mode, region)
        self._asg = autoscaling

    def mark(self, reason: str) -> bool:
        return self._asg.mark_unhealthy(reason)

    def clear(self) -> None:
        pass


# What the on_unhealthy command inherits: enough to find programs, speak the locale, go through
# the proxy and trust the CA. Not the agent's AWS keys or tokens from its EnvironmentFile: the
# command is the operator's, often a curl to a third party, and needs none of them.
CHILD_ENVIRON = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                 "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR",
                 "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE")


def child_environ(environ: Mapping[str, str], reason: str) -> Dict[str, str]:
    """The environment of the on_unhealthy command: CHILD_ENVIRON, and the reason."""
    env = {name: environ[name] for name in CHILD_ENVIRON if name in environ}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env["QUAY_BOOTSTRAP_REASON"] = reason
    return env


class CommandTarget:
    """`report.on_unhealthy`: the operator's command, run without a shell, the reason in
    QUAY_BOOTSTRAP_REASON (a load balancer deregistration, a page, a webhook), with only the
    environment in CHILD_ENVIRON. Only the program is logged: its arguments often carry a
    credential (a header, a webhook URL with a token) that no pattern can recognise."""

    name = "on_unhealthy"

    def __init__(self, argv: Sequence[str], timeout: float = 120, environ=os.environ,
                 redact: Optional[Callable[[str], str]] = None) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.environ = environ
        self.redact = redact or (lambda text: text)

    def mark(self, reason: str) -> bool:
        env = child_environ(self.environ, reason)
        program = self.argv[0] if self.argv else ""
        try:
            done = subprocess.run(self.argv, env=env, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)
        except (OSError, subprocess.TimeoutExpired) as err:
            # Not str(err): TimeoutExpired's text repeats the whole command line.
            error = (f"timed out after {self.timeout:g}s" if isinstance(err, subprocess.TimeoutExpired)
                     else err.strerror or type(err).__name__)
            log.error("on_unhealthy.failed", program=program, arguments=len(self.argv) - 1,
                      error=error)
            return False
        log.warning("on_unhealthy.ran", program=program, arguments=len(self.argv) - 1,
                    exit_code=done.returncode,
                    # Masked whole, then cut: a secret cut in two would match no more.
                    output=self.redact(done.stdout + done.stderr)[-2000:])
        return done.returncode == 0

    def clear(self) -> None:
        pass


def targets_from_config(cfg, redact: Optional[Callable[[str], str]] = None) -> List[Target]:
    """Every target the config names, in the order they are told; `redact` masks secrets in
    what the on_unhealthy command printed."""
    targets: List[Target] = []
    if cfg.report.autoscaling is not False:
        targets.append(AutoScalingTarget(cfg.report.autoscaling, cfg.stack.region or None))
    if cfg.report.on_unhealthy:
        targets.append(CommandTarget(cfg.report.on_unhealthy, redact=redact))
    return targets


class Escalation:
    """Tells every target, off the loop's thread (an AWS call or an operator's command may take
    a minute), and records each target's answer on the board as `<name>_marked`.

    Args:
        targets: returns the targets of the config in force (it may change on SIGHUP).
        record: the status board's `update`.
    """

    def __init__(self, targets: Callable[[], Sequence[Target]],
                 record: Callable[..., None]) -> None:
        self.targets = targets
        self.record = record

    def mark(self, reason: str) -> threading.Thread:
        log.error("instance.marking_unhealthy", reason=reason)
        self.record(marked_unhealthy=True, marked_reason=reason)
        thread = threading.Thread(target=self._tell, args=(reason,), name="escalate",
                                  daemon=True)
        thread.start()
        return thread

    def clear(self) -> None:
        log.info("instance.recovered")
        self.record(marked_unhealthy=False, marked_reason=None)
        for target in self.targets():
            try:
                target.clear()
            except Exception as err:  # noqa: BLE001 - reporting must not kill the loop
                log.error(f"{target.name}.clear_failed", error=str(err))

    def _tell(self, reason: str) -> None:
        for target in self.targets():
            try:
                self.record(**{f"{target.name}_marked": target.mark(reason)})
            except Exception as err:  # noqa: BLE001 - one target failing must not stop the next
                log.error(f"{target.name}.failed", error=str(err))
