"""The agent config's value checks (pure): a field's value in, the value back or a ValueError
whose text is what the user reads next to the key. config.py's validators call these."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from quay_bootstrap.schemes import schemes

# The supervisord programs /health/instance needs (Quay's conf/init/supervisord_conf_create.py).
HEALTH_SERVICES = ("nginx", "gunicorn-web", "gunicorn-registry")

# Letters and digits mixed, 12 or more: what an API token or a webhook's path secret looks like.
TOKEN_LIKE = re.compile(r"(?=[\w.~+/-]*\d)(?=[\w.~+/-]*[A-Za-z])[\w.~+/-]{12,}")


def check_url(value: str, allowed: Tuple[str, ...], what: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in allowed or not rest.strip("/"):
        wanted = ", ".join(f"{s}://..." for s in allowed)
        raise ValueError(f"{value!r} is not a {what} URL; expected one of {wanted}")
    return value


def port_mapping(value: str) -> str:
    if not re.fullmatch(r"(\d{1,3}(\.\d{1,3}){3}:)?\d{1,5}:\d{1,5}(/(tcp|udp))?", value):
        raise ValueError(f"{value!r} is not HOST:CONTAINER or IP:HOST:CONTAINER, e.g. 443:8443")
    return value


def stack_source(value: str) -> str:
    return check_url(value, schemes(), "stack source")


def endpoint_url(value: Optional[str]) -> Optional[str]:
    return None if value is None else check_url(value, ("http", "https"), "endpoint")


def owner(value: str) -> str:
    if not re.fullmatch(r"\d+:\d+", value):
        raise ValueError("expected numeric UID:GID such as 1001:0 (Quay's user and group)")
    return value


def lock_url(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    check_url(value, schemes(), "image lock")
    rest = value.partition("://")[2].strip("/")
    if value.startswith(("s3://", "gs://")) and "/" not in rest:
        raise ValueError(f"{value!r} names a bucket; the lock is one object, e.g. "
                         "s3://my-quay-config/quay-lock.yaml")
    return value


def regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as err:
        raise ValueError(f"not a valid regular expression: {err}") from None
    return value


def stringify(value: Any) -> Any:
    # YAML reads `4096` and `true` as numbers and booleans; Docker wants strings.
    if isinstance(value, dict):
        return {k: (str(v).lower() if isinstance(v, bool) else str(v))
                if isinstance(v, (int, float, bool)) else v for k, v in value.items()}
    return value


def quay_env(value: Dict[str, str]) -> Dict[str, str]:
    # quay-entrypoint.sh reads QUAYENTRY before its argument: the agent's registry-nomigrate
    # (an image older than the database) would be silently ignored, and alembic would fail.
    if "QUAYENTRY" in value:
        raise ValueError("QUAYENTRY overrides the entry point the agent picks (registry, or "
                         "registry-nomigrate for an image older than the database): remove it")
    if "," in value.get("QUAY_DISTRIBUTED_STORAGE_PREFERENCE", ""):
        # app.py: .split(), so "a,b" is one location that no config names.
        raise ValueError("QUAY_DISTRIBUTED_STORAGE_PREFERENCE has a comma: Quay splits it on "
                         "spaces, not commas; write the locations space-separated")
    services = value.get("QUAY_SERVICES")
    if services and services.strip():
        # supervisord_conf_create.py: a comma list; only the services named there start.
        named = {s.strip() for s in services.split(",") if s.strip()}
        missing = [s for s in HEALTH_SERVICES if s not in named]
        if missing:
            raise ValueError(f"QUAY_SERVICES leaves out {', '.join(missing)}: without them "
                             "/health/instance answers 502 or 503 forever; add them or remove "
                             "QUAY_SERVICES")
    return value


def health_url(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    check_url(value, ("http", "https"), "health")
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(value)
        if parts.port == 0:
            raise ValueError("port 0")
    except ValueError as err:
        raise ValueError(f"{value!r} is not a valid URL: {err}") from None
    if not parts.hostname:
        raise ValueError(f"{value!r} names no host")
    return value


def listen(value: str) -> str:
    # An explicit host: ":9101" or "0:9101" would silently listen on every address.
    match = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|\d{1,3}(?:\.\d{1,3}){3}|[A-Za-z][A-Za-z0-9.-]*)"
                         r":(\d{1,5})", value)
    if not match or not 0 < int(match.group(2)) < 65536 or not address(match.group(1)):
        raise ValueError("expected HOST:PORT with an explicit host, such as 127.0.0.1:9101, "
                         "[::1]:9101, or 0.0.0.0:9101 for a load balancer")
    return value


def argv(value: Any) -> Any:
    if isinstance(value, str):
        raise ValueError("give the command as a list of arguments; it runs without a shell")
    return value


def address(host: str) -> bool:
    """A valid IP address (IPv6 in brackets) or a host name."""
    import ipaddress

    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
            return True
        except ValueError:
            return False
    if host[0].isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def secret_args(command: List[str]) -> List[str]:
    """The arguments of a command (report.on_unhealthy) that may be a credential: a URL (a
    webhook's path is often its token), `user:password`, `name=value`, or a token-like word.
    Plain words ("quay-bootstrap", "/usr/bin/logger") are left readable."""
    return [a for a in command[1:] if not a.startswith("-") and len(a) >= 8
            and (any(c in a for c in ":=@") or TOKEN_LIKE.search(a))]
