"""The command line: parses arguments, configures logging, runs a command, maps errors to exit codes.

Only the standard library is imported at module level so `--help` and `version` start fast;
each command imports what it needs.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import List, Optional

from quay_bootstrap import __version__
from quay_bootstrap.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    QuayBootstrapError,
    exit_status_table,
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="agent config file (default: $QUAY_BOOTSTRAP_CONFIG or "
                             "/etc/quay-bootstrap/config.yaml)")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        default=argparse.SUPPRESS, help="overrides logging.level")
    common.add_argument("--log-format", choices=["auto", "json", "console"],
                        default=argparse.SUPPRESS, help="overrides logging.format")

    parser = argparse.ArgumentParser(
        prog="quay-bootstrap", parents=[common], epilog=exit_status_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turns a blank VM into a healthy node of a highly available Quay cluster: "
                    "fetches conf/stack from object storage, runs the locked Quay image, and "
                    "watches /health/instance.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    fetch = commands.add_parser("fetch", parents=[common],
                                help="fetch conf/stack now and switch to it if it changed")
    fetch.set_defaults(func=cmd_fetch)
    run = commands.add_parser(
        "run", parents=[common],
        help="fetch conf/stack, resolve the image lock, pull, run Quay, then watch "
             "/health/instance (what systemd runs)")
    run.add_argument("--once", action="store_true",
                     help="do one pass, wait for health, and exit (0 healthy, 1 not healthy "
                          "in time)")
    run.set_defaults(func=cmd_run)
    prefetch = commands.add_parser(
        "prefetch-image", parents=[common],
        help="pull the locked Quay image now (at image-build time), so a node can boot while "
             "the registry is unreachable")
    prefetch.set_defaults(func=cmd_prefetch)
    status = commands.add_parser("status", parents=[common],
                                 help="what the running agent knows about this node")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(func=cmd_status)
    validate = commands.add_parser(
        "validate", parents=[common],
        help="check the agent config (and with --stack a local conf/stack); changes nothing")
    validate.add_argument("--stack", metavar="DIR",
                          help="also check this conf/stack folder; without --config, only it")
    validate.set_defaults(func=cmd_validate)
    # The published stack's commands: another store than the config's stack.source with --to.
    to = argparse.ArgumentParser(add_help=False)
    to.add_argument("--to", metavar="URL",
                    help="the stack source (s3://, gs://, file://; default: stack.source)")
    publish = commands.add_parser(
        "publish", parents=[common, to],
        help="validate a conf/stack folder and make it the published version, atomically "
             "(nodes apply exactly that version)")
    publish.add_argument("dir", metavar="DIR", help="the conf/stack folder")
    publish.add_argument("--sign", metavar="KEY", help="sign with this ed25519 private key (PEM)")
    publish.set_defaults(func=cmd_publish)
    history = commands.add_parser("history", parents=[common, to],
                                  help="the published versions, newest first")
    history.add_argument("--json", action="store_true", help="print the pointer as JSON")
    history.set_defaults(func=cmd_history)
    diff = commands.add_parser("diff", parents=[common, to],
                               help="what changed between two published versions (secrets masked)")
    diff.add_argument("a", metavar="A", help="a version id (6+ characters) `history` shows")
    diff.add_argument("b", metavar="B", help="another one")
    diff.set_defaults(func=cmd_diff)
    rollback = commands.add_parser(
        "rollback", parents=[common, to],
        help="publish an earlier version again (it rolls through the budget like any change)")
    rollback.add_argument("version", metavar="VERSION", help="a version id `history` shows")
    rollback.add_argument("--sign", metavar="KEY", help="sign with this ed25519 private key (PEM)")
    rollback.set_defaults(func=cmd_rollback)
    cluster = commands.add_parser(
        "cluster", parents=[common, to],
        help="every node's last status, the leases, the canary and the published version, read "
             "from the object store (exit 0 when every fresh node is healthy on that version)")
    cluster.add_argument("--json", action="store_true", help="print JSON")
    cluster.add_argument("--wait", metavar="TIMEOUT", help="read again every 5 s until ok or "
                         "TIMEOUT (e.g. 10m) is up")
    cluster.set_defaults(func=cmd_cluster)
    version = commands.add_parser("version", parents=[common], help="print the version")
    version.set_defaults(func=cmd_version)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code not in (0, None) else EXIT_OK
    if args.func is cmd_version:
        return cmd_version(args)

    from quay_bootstrap import logs

    redactor = logs.Redactor()
    redactor.add_environ(os.environ)
    logs.configure(redactor, level=getattr(args, "log_level", "info"),
                   fmt=getattr(args, "log_format", "auto"))
    # What a command prints and what a thread dies of pass the redactor too, like a log line.
    saved = sys.stdout, threading.excepthook
    sys.stdout = logs.RedactedStream(sys.stdout, redactor)
    threading.excepthook = logs.log_thread_crash
    try:
        return args.func(args, redactor)
    except QuayBootstrapError as err:
        import structlog

        structlog.get_logger("quay_bootstrap").debug("command.failed", exc_info=True)
        print(f"quay-bootstrap: {redactor.redact_text(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # noqa: BLE001 - the last line of defence: say it, redacted
        import structlog

        structlog.get_logger("quay_bootstrap").error("command.crashed", exc_info=True)
        print(f"quay-bootstrap: unexpected {type(err).__name__}: "
              f"{redactor.redact_text(str(err))}; this is a bug, please report it with the "
              "log above", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        sys.stdout, threading.excepthook = saved


def _load(args: argparse.Namespace, redactor):
    from quay_bootstrap import config, logs

    path = config.config_path(getattr(args, "config", None), os.environ)
    cfg = config.load_config(path, redactor.add)
    if not hasattr(args, "log_level") or not hasattr(args, "log_format"):
        logs.configure(redactor, level=getattr(args, "log_level", cfg.logging.level),
                       fmt=getattr(args, "log_format", cfg.logging.format))
    return cfg


def cmd_fetch(args: argparse.Namespace, redactor) -> int:
    from quay_bootstrap.pipeline import fetcher, open_stack_store

    cfg = _load(args, redactor)
    stack = cfg.stack
    store = open_stack_store(cfg, redactor.add)
    result = fetcher(cfg, store, redactor.add).fetch()
    # Without a health check to wait for, a stack that validated and went live is the best
    # known; `run` narrows this to "Quay was healthy on it".
    store.mark_known_good(result.version)
    state = "applied" if result.changed else "unchanged"
    print(f"stack  {state:<9}  version {result.version[:12]}  {result.files} files, "
          f"{_size(result.bytes)} ({result.downloaded} downloaded, {result.reused} reused)  "
          f"{result.seconds:.2f}s")
    print(f"       live at {stack.dir / 'current'}")
    return EXIT_OK


def cmd_run(args: argparse.Namespace, redactor) -> int:
    from quay_bootstrap.pipeline import Pass

    cfg = _load(args, redactor)
    if not args.once:
        return _daemon(args, cfg, redactor)
    import time

    from quay_bootstrap import stores
    from quay_bootstrap.aws import node_id
    from quay_bootstrap.rollout import Roll

    one = Pass(cfg, redactor.add)
    try:
        outcome = Roll(stores.open_leases, node_id(cfg), time.sleep).once(one)
    finally:
        _print_steps(one.outcome.steps)
    if outcome.healthy:
        print(f"node healthy: stack {outcome.stack_version[:12]}, image {outcome.image_digest}, "
              f"container {cfg.container.name}")
        return EXIT_OK
    print(f"node NOT healthy within {cfg.health.start_period:g}s: {outcome.probe.error}; the "
          f"container {cfg.container.name} was left running for debugging "
          f"(docker logs {cfg.container.name})")
    return EXIT_FAILURE


def _daemon(args: argparse.Namespace, cfg, redactor) -> int:
    import signal
    import threading

    from quay_bootstrap.daemon import Daemon
    from quay_bootstrap.pipeline import Pass

    stop = threading.Event()
    cache: dict = {}  # clients shared by every pass of this daemon
    daemon = Daemon(cfg, lambda c, sleep: Pass(c, redactor.add, sleep=sleep, cache=cache),
                    stop, reload_config=lambda: _load(args, redactor), redact=redactor.redact)
    # Handlers only set flags; the loop does the work. SIGTERM leaves Quay running.
    signal.signal(signal.SIGTERM, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.request_reload())
    return daemon.run()


def cmd_prefetch(args: argparse.Namespace, redactor) -> int:
    from quay_bootstrap.engine import Docker
    from quay_bootstrap.image import ensure_image, registry_auth
    from quay_bootstrap.pipeline import resolve_image

    cfg = _load(args, redactor)
    resolved = resolve_image(cfg)
    auth = registry_auth(cfg.image.auth, resolved.ref.registry, redactor.add)
    image = ensure_image(Docker(), resolved.ref, auth=auth, deadline=cfg.image.pull_deadline)
    print(f"image  {'pulled' if image.pulled else 'present':<9}  {image.digest}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, redactor) -> int:
    import json
    import urllib.request

    cfg = _load(args, redactor)
    try:
        with urllib.request.urlopen(f"http://{cfg.report.listen}/status", timeout=2) as answer:
            status = json.loads(answer.read())
        source = f"http://{cfg.report.listen}/status"
    except OSError:
        try:
            status = json.loads(cfg.report.state_file.read_text())
        except (OSError, ValueError):
            print(f"quay-bootstrap: no running agent answers on {cfg.report.listen} and "
                  f"{cfg.report.state_file} is missing; is quay-bootstrap.service running?",
                  file=sys.stderr)
            return EXIT_FAILURE
        source = f"{cfg.report.state_file} (the agent's endpoint did not answer)"
    status = redactor.redact(status)  # a state file left by an older agent, or a stray endpoint
    if args.json:
        print(json.dumps(status, indent=1, default=str))
        return EXIT_OK
    import time

    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(status.get("since", 0))))
    probe = status.get("last_probe") or {}
    print(f"state       {status.get('state')} since {since}")
    print(f"stack       {str(status.get('stack_version', ''))[:12]}")
    print(f"image       {status.get('image_digest', '')}")
    services = ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in
                         sorted((probe.get("services") or {}).items()))
    print(f"last probe  {'ok' if probe.get('ok') else probe.get('error', 'none yet')}"
          + (f" ({services})" if services else ""))
    print(f"restarts    {status.get('restarts_in_window', 0)} in window, next backoff "
          f"{status.get('backoff_seconds', 0):g}s")
    marked = status.get("marked_unhealthy")
    print(f"marked      {'UNHEALTHY: ' + str(status.get('marked_reason')) if marked else 'no'}")
    print(f"(from {source})")
    return EXIT_OK


def _print_steps(steps) -> None:
    for step in steps:
        print(f"{step.name:<10} {step.result:<12} {step.seconds:6.2f}s  {step.detail}")


def cmd_validate(args: argparse.Namespace, redactor) -> int:
    from pathlib import Path

    explicit = hasattr(args, "config") or "QUAY_BOOTSTRAP_CONFIG" in os.environ
    if explicit or not args.stack:
        from quay_bootstrap.lock import check_policy, parse_reference

        cfg = _load(args, redactor)
        check_policy(parse_reference(cfg.image.reference), cfg.image.allowed_tags)
        print(f"config ok: stack from {cfg.stack.source}, image {cfg.image.reference}")
    if args.stack:
        from quay_bootstrap.stack.fetch import check_local_stack

        checked = check_local_stack(Path(args.stack), cfg.container.env if explicit else {})
        redactor.add(checked.secrets)
        for where, what in checked.warnings:
            print(f"warning: {where}: {what}")
        if not checked.ok:
            raise ConfigError(f"the conf/stack has {len(checked.errors)} problem(s)",
                              where=args.stack, problems=checked.errors)
        print(f"stack ok: {args.stack}")
    return EXIT_OK


def _publisher(args: argparse.Namespace, redactor):
    from quay_bootstrap.publish import Publisher, uploader
    from quay_bootstrap.stack.plan import Limits
    from quay_bootstrap.stack.published import open_published

    cfg = _load(args, redactor)
    leases = open_published(cfg.stack, getattr(args, "to", None))
    limits = Limits(cfg.stack.max_files, cfg.stack.max_bytes)
    return cfg, Publisher(leases, limits, uploader(leases))


def _key(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    try:
        return open(path, "rb").read()
    except OSError as err:
        raise ConfigError(f"the signing key cannot be read: {err.strerror}", where=path,
                          hint="Name the ed25519 private key (PEM) to sign with") from err


def _published_line(outcome, url: str) -> str:
    pointer = outcome.pointer
    if not outcome.published:
        return (f"version {pointer.version[:12]} is already the published one (serial "
                f"{pointer.serial}); nothing changed")
    return (f"published version {pointer.version[:12]} as serial {pointer.serial} to {url}: "
            f"{len(pointer.changed)} file(s) changed{', signed' if pointer.signature else ''}")


def cmd_publish(args: argparse.Namespace, redactor) -> int:
    from pathlib import Path

    from quay_bootstrap.publish import read_folder, stack_secrets, validator

    cfg, publisher = _publisher(args, redactor)
    files = read_folder(Path(args.dir), publisher.limits)
    redactor.add(stack_secrets(files, cfg.container.env))
    outcome = publisher.publish(files, _key(args.sign), validator(cfg.container.env))
    print(_published_line(outcome, publisher.url))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace, redactor) -> int:
    from quay_bootstrap.publish import validator

    cfg, publisher = _publisher(args, redactor)
    outcome = publisher.rollback(args.version, _key(args.sign), validator(cfg.container.env))
    print(_published_line(outcome, publisher.url))
    return EXIT_OK


def cmd_history(args: argparse.Namespace, redactor) -> int:
    from quay_bootstrap.publish import history_lines

    _, publisher = _publisher(args, redactor)
    pointer, _ = publisher.current()
    if args.json:
        print(pointer.to_json().decode() if pointer else "null")
        return EXIT_OK
    if pointer is None:
        print(f"nothing is published at {publisher.url}")
        return EXIT_OK
    print("serial  version       published at          by  changes")
    for line in history_lines(pointer):
        print(line)
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, redactor) -> int:
    from quay_bootstrap.publish import diff_lines, stack_secrets

    cfg, publisher = _publisher(args, redactor)
    old, new = publisher.version(args.a), publisher.version(args.b)
    a, b = publisher.files(old), publisher.files(new)
    secrets = stack_secrets(a, cfg.container.env) + stack_secrets(b, cfg.container.env)
    redactor.add(secrets)
    lines = diff_lines(a, b, secrets, old.version[:12], new.version[:12])
    sys.stdout.write("".join(lines) if lines else "no difference\n")
    return EXIT_OK


def cmd_cluster(args: argparse.Namespace, redactor) -> int:
    from quay_bootstrap.cluster_view import run_cluster
    from quay_bootstrap.units import parse_duration

    cfg = _load(args, redactor)
    try:
        wait = parse_duration(args.wait) if args.wait else None
    except ValueError as err:
        raise ConfigError(f"--wait: {err}", where="--wait",
                          hint="A duration such as 90s or 10m") from err
    return run_cluster(cfg.stack, args.json, wait, sys.stdout, url=getattr(args, "to", None))


def cmd_version(args: argparse.Namespace, redactor=None) -> int:
    print(f"quay-bootstrap {__version__}")
    return EXIT_OK


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.1f} MiB"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

