"""Pure checks of a conf/stack before it goes live, and the secrets it holds (for log redaction)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Collection, List, Optional, Set, Tuple
from urllib.parse import urlsplit

import yaml

# util/config/schema.py in quay/quay: keys Quay refuses to start without.
REQUIRED_KEYS = (
    "PREFERRED_URL_SCHEME", "SERVER_HOSTNAME", "DB_URI", "AUTHENTICATION_TYPE",
    "DISTRIBUTED_STORAGE_CONFIG", "DISTRIBUTED_STORAGE_PREFERENCE", "BUILDLOGS_REDIS",
    "USER_EVENTS_REDIS", "DEFAULT_TAG_EXPIRATION", "TAG_EXPIRATION_OPTIONS",
)
# Values under these key names are secret wherever they appear in config.yaml (quay-facts.md).
_SECRET_NAME = re.compile(r"(secret|password|passwd|psk|^access_key$|_key$|token)", re.I)


@dataclass(frozen=True)
class StackCheck:
    """Findings about one conf/stack: errors block it, warnings are logged."""

    errors: Tuple[Tuple[str, str], ...] = ()
    warnings: Tuple[Tuple[str, str], ...] = ()
    secrets: frozenset = field(default_factory=frozenset)
    settings: Optional[dict] = None  # the parsed config.yaml, when it parsed

    @property
    def ok(self) -> bool:
        return not self.errors


def check_stack(names: Collection[str], config_yaml: Optional[bytes]) -> StackCheck:
    """Check a conf/stack from its file names and the bytes of its config.yaml.

    Args:
        names: every file path in the stack, relative to it.
        config_yaml: the content of config.yaml, or None when there is none.
    """
    errors: List[Tuple[str, str]] = []
    warnings: List[Tuple[str, str]] = []
    if config_yaml is None:
        nested = sorted(n for n in names if n.endswith("/config.yaml"))
        hint = (f"; found {nested[0]!r}: should stack.source end with "
                f"/{nested[0].rsplit('/', 1)[0]}?" if nested else "")
        return StackCheck(errors=(("config.yaml", "missing: Quay cannot start without it" + hint),))
    try:
        config = yaml.safe_load(config_yaml.decode("utf-8"))
    except UnicodeDecodeError:
        return StackCheck(errors=(("config.yaml", "is not UTF-8 text"),))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"config.yaml line {mark.line + 1}" if mark else "config.yaml"
        return StackCheck(errors=((where, f"is not valid YAML: "
                                          f"{getattr(err, 'problem', None) or err}"),))
    if not isinstance(config, dict):
        return StackCheck(errors=(("config.yaml", "must be a YAML mapping of Quay settings, "
                                                  f"not {type(config).__name__}"),))
    secrets = stack_secrets(config)
    if not config:
        errors.append(("config.yaml", "is empty"))
    for key in REQUIRED_KEYS:
        if key not in config:
            errors.append((f"config.yaml: {key}", "required by Quay's schema but missing"))
    tls_here = (str(config.get("PREFERRED_URL_SCHEME", "")).lower() == "https"
                and config.get("EXTERNAL_TLS_TERMINATION") is not True)
    if tls_here:
        for name in ("ssl.cert", "ssl.key"):
            if name not in names:
                errors.append((name, "missing: PREFERRED_URL_SCHEME is https and "
                                     "EXTERNAL_TLS_TERMINATION is not true, so Quay "
                                     "terminates TLS itself and needs it"))
    if config.get("SETUP_COMPLETE") is not True:
        warnings.append(("config.yaml: SETUP_COMPLETE", "is not true; Quay will show the "
                                                         "setup screen"))
    for key in ("SECRET_KEY", "DATABASE_SECRET_KEY"):
        if not config.get(key):
            warnings.append((f"config.yaml: {key}", "is missing; it must be set and the same "
                                                    "on every node of the cluster"))
    return StackCheck(errors=tuple(errors), warnings=tuple(warnings), secrets=frozenset(secrets),
                      settings=config)


def stack_secrets(config: Any) -> Set[str]:
    """Every secret value in a parsed config.yaml: secret-named keys anywhere, URL passwords."""
    found: Set[str] = set()

    def walk(node: Any, name: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, str(key))
        elif isinstance(node, list):
            for item in node:
                walk(item, name)
        elif isinstance(node, (str, int, float)) and not isinstance(node, bool):
            text = str(node)
            if _SECRET_NAME.search(name):
                found.add(text)
            if "://" in text:
                try:
                    password = urlsplit(text).password
                except ValueError:
                    password = None
                if password:
                    found.add(password)

    walk(config, "")
    return found
