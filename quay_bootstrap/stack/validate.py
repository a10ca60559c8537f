"""Pure checks of a conf/stack before it goes live, and the secrets it holds (for log redaction)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Collection, List, Mapping, Optional, Set, Tuple
from urllib.parse import urlsplit

import yaml

from quay_bootstrap import safe_yaml
from quay_bootstrap.logs import SECRET_NAME

# What stops Quay from starting (quay-facts.md, "conf/stack"): config-tool's validation (run
# by conf/init before anything else), boot.py's SETUP_COMPLETE and app.py's DATABASE_SECRET_KEY.
# util/config/schema.py's required-key list is NOT enforced by Quay, so it is not used here.
TAG_EXPIRATION_DEFAULTS = ("2w", ["0s", "1d", "1w", "2w", "4w"])
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*(:\d{1,5})?$")
# Values under these key names are secret wherever they appear in config.yaml (quay-facts.md).


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


def check_stack(names: Collection[str], config_yaml: Optional[bytes],
                read: Optional[Callable[[str], bytes]] = None,
                environ: Mapping[str, str] = MappingProxyType({})) -> StackCheck:
    """Check a conf/stack as Quay will at start: what would stop it is an error (the node must
    not be moved onto it), what only degrades it is a warning.

    Args:
        names: every file path in the stack, relative to it.
        config_yaml: the content of config.yaml, or None when there is none.
        read: reads another file of the stack (ssl.cert, ssl.key) for the TLS checks.
        environ: the container's environment (container.env), which Quay also reads.
    """
    errors: List[Tuple[str, str]] = []
    warnings: List[Tuple[str, str]] = []
    if config_yaml is None:
        nested = sorted(n for n in names if n.endswith("/config.yaml"))
        hint = (f"; found {nested[0]!r}: should stack.source end with "
                f"/{nested[0].rsplit('/', 1)[0]}?" if nested else "")
        return StackCheck(errors=(("config.yaml", "missing: Quay cannot start without it" + hint),))
    try:
        config = safe_yaml.load(config_yaml)
    except UnicodeDecodeError:
        return StackCheck(errors=(("config.yaml", "is not UTF-8 text"),))
    except yaml.YAMLError as err:
        return StackCheck(errors=(("config.yaml " + safe_yaml.where(err, config_yaml),
                                   "is not valid YAML"),))
    if not isinstance(config, dict):
        return StackCheck(errors=(("config.yaml", "must be a YAML mapping of Quay settings, "
                                                  f"not {type(config).__name__}"),))
    secrets = stack_secrets(config)
    if not config:
        errors.append(("config.yaml", "is empty"))
    errors += _quay_refuses(config)
    scheme = config.get("PREFERRED_URL_SCHEME", "http")
    if scheme == "https" and config.get("EXTERNAL_TLS_TERMINATION") is not True:
        missing = [name for name in ("ssl.cert", "ssl.key") if name not in names]
        for name in missing:
            errors.append((name, "missing: PREFERRED_URL_SCHEME is https and "
                                 "EXTERNAL_TLS_TERMINATION is not true, so Quay "
                                 "terminates TLS itself and needs it"))
        if not missing and read is not None:
            key_pem = read("ssl.key")
            secrets |= key_secrets(key_pem)
            errors += _tls_problems(read("ssl.cert"), key_pem, str(config.get("SERVER_HOSTNAME", "")))
    if "ssl.key" in names and (scheme == "http" or (scheme == "https" and
                               config.get("EXTERNAL_TLS_TERMINATION") is True)):
        # nginx_conf_create.py turns TLS on when ssl.key exists, whatever the config says; 8080
        # then answers only 301s, and Quay's own gunicorn self-checks (plain http to localhost)
        # follow them to port 443: /health/instance answers 503 forever.
        why = ("PREFERRED_URL_SCHEME is http" if scheme == "http"
               else "EXTERNAL_TLS_TERMINATION is true")
        errors.append(("ssl.key", f"is present but {why}: Quay serves TLS whenever ssl.key "
                       "exists and its health checks then fail forever (503); remove ssl.key "
                       "and ssl.cert, or set PREFERRED_URL_SCHEME: https without "
                       "EXTERNAL_TLS_TERMINATION"))
    errors += _storage_preference(config, environ)
    if not config.get("SECRET_KEY"):
        warnings.append(("config.yaml: SECRET_KEY", "is missing: every Quay process then makes "
                         "its own random key and sessions break across nodes; set it, the same "
                         "on every node"))
    warnings += _s3_region_over_endpoint(config)
    if "DISTRIBUTED_STORAGE_PREFERENCE" not in config and \
            "QUAY_DISTRIBUTED_STORAGE_PREFERENCE" not in environ:
        warnings.append(("config.yaml: DISTRIBUTED_STORAGE_PREFERENCE", "is missing (and "
                         "container.env has no QUAY_DISTRIBUTED_STORAGE_PREFERENCE)"))
    return StackCheck(errors=tuple(errors), warnings=tuple(warnings), secrets=frozenset(secrets),
                      settings=config)


def _s3_region_over_endpoint(config: dict) -> List[Tuple[str, str]]:
    """S3Storage with `s3_region` goes to AWS's endpoint for that region and ignores
    `endpoint_url` and `host` (storage/cloud.py, v3.17.4 and v3.18.0): an S3-compatible store
    (Ceph RGW, MinIO) configured so is silently not used."""
    found = []
    locations = config.get("DISTRIBUTED_STORAGE_CONFIG")
    for name, location in (locations.items() if isinstance(locations, dict) else ()):
        if not (isinstance(location, list) and len(location) == 2 and
                location[0] == "S3Storage" and isinstance(location[1], dict)):
            continue
        params = location[1]
        if params.get("s3_region") and (params.get("endpoint_url") or params.get("host")):
            found.append((f"config.yaml: DISTRIBUTED_STORAGE_CONFIG.{name}",
                          "S3Storage has s3_region and endpoint_url (or host): Quay then uses "
                          "AWS S3 in that region and ignores endpoint_url; for an S3-compatible "
                          "store remove s3_region (or use RadosGWStorage)"))
    return found


def _storage_preference(config: dict, environ: Mapping[str, str]) -> List[Tuple[str, str]]:
    """Every storage location Quay will prefer must be configured: Quay starts without one, but
    writes each upload to the first (data/registry_model/blobuploader.py). It splits
    QUAY_DISTRIBUTED_STORAGE_PREFERENCE on whitespace (app.py), so "a,b" is one unknown name."""
    locations = config.get("DISTRIBUTED_STORAGE_CONFIG")
    if not isinstance(locations, dict) or not locations:
        return []
    env = environ.get("QUAY_DISTRIBUTED_STORAGE_PREFERENCE", "").split()
    if env:
        where, preferred = "container.env: QUAY_DISTRIBUTED_STORAGE_PREFERENCE", env
    else:
        where, preferred = "config.yaml: DISTRIBUTED_STORAGE_PREFERENCE", \
            config.get("DISTRIBUTED_STORAGE_PREFERENCE")
    if not isinstance(preferred, list):
        return [] if preferred is None else [(where, "must be a list of storage location names")]
    unknown = [str(name) for name in preferred if name not in locations]
    if not unknown:
        return []
    hint = (" (Quay splits this variable on spaces, not commas: write them space-separated)"
            if env and any("," in name for name in unknown) else "")
    return [(where, f"names {', '.join(repr(n) for n in unknown)}, not in "
                    f"DISTRIBUTED_STORAGE_CONFIG ({', '.join(map(str, locations))}): Quay writes "
                    f"every upload to the first preferred location, so pushes would fail{hint}")]


def _quay_refuses(config: dict) -> List[Tuple[str, str]]:
    """What config-tool or Quay's boot refuses, as (where, what) pairs."""
    problems: List[Tuple[str, str]] = []

    def refuse(key: str, what: str) -> None:
        problems.append((f"config.yaml: {key}", what))

    hostname = config.get("SERVER_HOSTNAME")
    if not hostname:
        refuse("SERVER_HOSTNAME", "is missing; Quay's config-tool refuses to start without it")
    elif not isinstance(hostname, str) or not _HOSTNAME.match(hostname):
        refuse("SERVER_HOSTNAME", "is not a valid host name (HOST or HOST:PORT)")
    if config.get("PREFERRED_URL_SCHEME", "http") not in ("http", "https"):
        refuse("PREFERRED_URL_SCHEME", "must be exactly http or https")
    if not config.get("DB_URI"):
        refuse("DB_URI", "is missing; Quay's config-tool refuses to start without it")
    for key in ("BUILDLOGS_REDIS", "USER_EVENTS_REDIS"):
        value = config.get(key)
        if not isinstance(value, dict) or not value.get("host"):
            refuse(key, "needs a `host`; Quay's config-tool refuses to start without it")
    if not config.get("DISTRIBUTED_STORAGE_CONFIG"):
        refuse("DISTRIBUTED_STORAGE_CONFIG", "is missing or empty; Quay needs a storage engine")
    default, options = TAG_EXPIRATION_DEFAULTS
    options = config.get("TAG_EXPIRATION_OPTIONS", options)
    if config.get("DEFAULT_TAG_EXPIRATION", default) not in (options or []):
        refuse("DEFAULT_TAG_EXPIRATION", f"must be one of TAG_EXPIRATION_OPTIONS {options}")
    if config.get("SETUP_COMPLETE") is not True:
        refuse("SETUP_COMPLETE", "is not true; Quay's boot stops (boot.py): finish the set-up "
               "with the config tool and set it to true")
    if not config.get("DATABASE_SECRET_KEY"):
        refuse("DATABASE_SECRET_KEY", "is missing; Quay does not start without it (app.py): "
               "set it, the same on every node, never changed once data is written")
    return problems


def _tls_problems(cert_pem: bytes, key_pem: bytes, server_hostname: str) -> List[Tuple[str, str]]:
    """Whether ssl.cert and ssl.key go together and the certificate names SERVER_HOSTNAME, as
    config-tool checks before Quay starts. The standard library's ssl does it (the daemon loads
    ssl anyway; a crypto library would cost it 10+ MiB for good)."""
    import ipaddress
    import ssl
    import tempfile

    with tempfile.TemporaryDirectory(prefix="quay-bootstrap-tls-") as folder:
        cert, key = os.path.join(folder, "ssl.cert"), os.path.join(folder, "ssl.key")
        for path, data in ((cert, cert_pem), (key, key_pem)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(data)
        try:
            decoded = ssl._ssl._test_decode_cert(cert)  # noqa: SLF001 - CPython's own decoder
        except (ssl.SSLError, ValueError):
            return [("ssl.cert", "is not a PEM certificate")]
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
        except ssl.SSLError as err:
            if "KEY_VALUES_MISMATCH" in str(err):
                return [("ssl.key", "does not match ssl.cert")]
            return [("ssl.key", "is not an unencrypted PEM private key")]
    host = server_hostname.rsplit(":", 1)[0] if server_hostname.count(":") == 1 \
        else server_hostname
    names = decoded.get("subjectAltName", ())
    try:
        address = ipaddress.ip_address(host)
        ok = any(kind == "IP Address" and ipaddress.ip_address(value.strip()) == address
                 for kind, value in names)
    except ValueError:
        ok = any(kind == "DNS" and _host_matches(value, host) for kind, value in names)
    if not ok:
        return [("ssl.cert", f"is not valid for SERVER_HOSTNAME {host!r} (its subjectAltName "
                             "must name it); Quay's config-tool refuses it")]
    return []


def _host_matches(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        return "." in host and host.split(".", 1)[1] == pattern[2:]
    return pattern == host


def key_secrets(pem: bytes) -> Set[str]:
    """The lines of a private key's body: a PEM block is masked whole by its markers, but a line
    quoted alone (an error from a TLS library) has none."""
    lines = pem.decode("ascii", "replace").splitlines()
    return {line.strip() for line in lines if len(line.strip()) >= 16 and "-----" not in line}


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
            # A number is a secret only when it is long enough to be one (not a port or a TTL).
            if SECRET_NAME.search(name) and (isinstance(node, str) or len(text) >= 8):
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
