"""Logging: structlog configured once, JSON lines for journald, console on a TTY, secrets redacted."""
from __future__ import annotations

import logging
import re
import sys
import threading
from typing import Any, Iterable, Mapping, MutableMapping, Optional, TextIO

import structlog

MASK = "***"

# Names whose values are secret wherever they appear: event keys, config.yaml keys, environment
# variables, `name: value` in text (case-insensitive). BITTORRENT_FILENAME_PEPPER is Quay's.
SECRET_NAME = re.compile(
    r"(pass(word|wd)?|secret|token|psk|credential|authorization|cookie|pepper|private|"
    r"api_?key|access_?key|_key$|^key$)", re.I)
# user:password@ in any URL (DB_URI, redis://, registry URLs).
# Greedy up to the last @ before the path: a password may hold an unescaped @.
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):(?P<pw>[^/\s]*)@")
# AWS access key ids by their shape, however they arrived (an SDK error, a command's output).
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AROA|AIDA)[A-Z0-9]{16}\b")
# A token alone as a URL's user (https://ghp_xxx@github.com/...): 16 characters or more, so
# ssh://git@host keeps its user.
_URL_TOKEN_USER = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^:/@\s]{16,}@")
# Presigned URL signatures (S3 SigV2/SigV4, GCS V2/V4): the whole query string goes.
_PRESIGNED = re.compile(
    r"(https?://[^\s?\"']+)\?[^\s\"']*(X-Amz-Signature|X-Amz-Credential|X-Goog-Signature|"
    r"X-Goog-Credential|Signature=|AWSAccessKeyId|GoogleAccessId)[^\s\"']*", re.I)
_PEM_PRIVATE = re.compile(
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|$)", re.S)
# Credentials in HTTP headers, as curl's -H or a logged request shows them.
_HEADER = re.compile(
    r"\b((?:proxy-)?authorization|x-api-key|api-key|x-auth-token|private-token|x-vault-token|"
    r"(?:set-)?cookie)(\s*:\s*)[^\r\n\"']+", re.I)
_SCHEME_CREDENTIAL = re.compile(r"\b(bearer|basic|digest|negotiate)\s+[A-Za-z0-9._~+/=-]{6,}", re.I)
# ?token=..., &api_key=..., &sig=... in any URL (webhooks, signed links).
_QUERY = re.compile(
    r"([?&;][^=&\s\"'#]*(token|key|secret|sig|signature|pass|pwd|auth|credential)[^=&\s\"'#]*=)"
    r"[^&\s\"'#]+", re.I)
# password=value and "token": "value" in free text (exceptions, command output). Not `KEY: value`:
# the agent's own messages say "DATABASE_SECRET_KEY: is missing".
_NAMED = re.compile(
    r"(\b[\w.-]*(?:password|passwd|secret|token|pepper|credential|api_?key|access_?key)[\w.-]*"
    r"(?:=|\"\s*:\s*\"))([^\s\"',;}&]+)", re.I)
_NAMED_QUOTED = re.compile(
    r"(\b[\w.-]*(?:password|passwd|secret|token|pepper|credential|api_?key|access_?key)[\w.-]*"
    r"\s*=\s*)([\"'])(.*?)\2", re.I)
# Command-line options whose next argument is a credential (curl -u user:pw, --token T).
_SECRET_OPTIONS = {"-u", "--user", "--proxy-user", "--password", "--passwd", "--pass", "--token",
                   "--oauth2-bearer", "--api-key", "--secret", "--auth", "--header-secret"}
# An environment value shorter than this is not registered: "true" and "1" are not secrets,
# and masking them everywhere would garble every line.
_MIN_ENV_SECRET = 8
# A registered secret shorter than this is masked only where it stands as a value (see
# Redactor.add); shorter than _MIN_SECRET, it is not registered at all.
_STRONG_SECRET = 8
_MIN_SECRET = 4
# Where a short secret stands as a value: after the start, whitespace, a quote, a comma, = or :
# or an opening bracket; before the end, whitespace, a quote, , ; & @ or a closing bracket,
# with perhaps one . : ! or ? between (the end of a sentence, `user demo: denied`).
_VALUE_BEFORE = r"(?<![^\s\"'`,=:(\[{<])"
_VALUE_AFTER = r"(?=[.:!?]?(?:[\s\"'`,;&@)\]}>]|$))"
_WEAK_HINT = (f"secrets under {_STRONG_SECRET} characters are masked only where they stand as "
              "values, not inside longer words; use a longer one")


class Redactor:
    """A structlog processor that masks secrets in every event before it is rendered.

    It masks the values of secret-looking keys, passwords inside URLs, presigned or token query
    strings, credential headers, PEM private keys, the arguments of credential options in
    argument lists, and every value registered with `add` (secrets found in conf/stack, the
    agent config, the environment, or read from a password file), wherever they appear in a
    string, a list, a set, bytes or an object's text; a value shorter than 8 characters only
    where it stands as a value, not inside a longer word (see `add`).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: frozenset = frozenset()
        # What redact_text reads, swapped whole: strong secrets, longest first, and the pattern
        # of the weak ones (None when there is none).
        self._masks: tuple[tuple[str, ...], Optional[re.Pattern]] = ((), None)

    def add(self, values: Iterable[str]) -> None:
        """Remember secret values to mask from now on.

        A value of 8 characters or more is masked wherever it appears, even inside a word. A
        shorter one is weak: masked everywhere, `demo` would turn the container `quay-demo`
        into `quay-***` and eat words of image names. So it is masked only where it stands as
        a value, a whole token: it begins at the start of the text or after whitespace, a
        quote, a comma, `=`, `:` or an opening bracket, and it ends at the end of the text or
        before whitespace, a quote, `,`, `;`, `&`, `@` or a closing bracket, perhaps with one
        `.`, `:`, `!` or `?` between. With `demo`: a field whose value is `demo`,
        `password=demo`, `https://user:demo@host`, `"demo"` and `login failed for demo.` are
        masked; `quay-demo`, `quay.io/org/demo-image:v1`, `demo.example.com` are not (a tag,
        `image:demo`, is). The first time a weak value is registered, the agent warns
        (`secrets.weak`, with its length, never the value). Values under 4 characters are
        ignored: too noisy.
        """
        fresh = {v for v in values if isinstance(v, str) and len(v) >= _MIN_SECRET}
        with self._lock:
            new = fresh - self._values
            if not new:
                return
            self._values = self._values | new
            # Longest first, so a secret that contains another is masked whole.
            ordered = sorted(self._values, key=len, reverse=True)
            weak = [v for v in ordered if len(v) < _STRONG_SECRET]
            pattern = (re.compile(_VALUE_BEFORE + "(?:" + "|".join(map(re.escape, weak)) + ")"
                                  + _VALUE_AFTER) if weak else None)
            self._masks = (tuple(v for v in ordered if len(v) >= _STRONG_SECRET), pattern)
        for value in sorted(new, key=len):
            if len(value) < _STRONG_SECRET:
                self._warn_weak(value)

    def _warn_weak(self, value: str) -> None:
        # The hint is fixed text: if the secret is one of its words, masking it there would
        # show which word, so the hint is left out.
        hint = _WEAK_HINT if self.redact_text(_WEAK_HINT) == _WEAK_HINT else None
        structlog.get_logger(__name__).warning(
            "secrets.weak", length=len(value), minimum=_STRONG_SECRET,
            **({"hint": hint} if hint else {}))

    def add_environ(self, environ: Mapping[str, str]) -> None:
        """Register the environment's secrets (AWS keys from the unit's EnvironmentFile, tokens),
        and AWS_ACCESS_KEY_ID too: it names the account's key, and it is half of the pair."""
        self.add(value for name, value in environ.items()
                 if (SECRET_NAME.search(name) or name == "AWS_ACCESS_KEY_ID")
                 and len(value) >= _MIN_ENV_SECRET)

    def redact_text(self, text: str) -> str:
        strong, weak = self._masks
        for value in strong:
            if value in text:
                text = text.replace(value, MASK)
        if weak is not None:
            text = weak.sub(MASK, text)
        text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        text = _URL_TOKEN_USER.sub(lambda m: f"{m['scheme']}{MASK}@", text)
        text = _AWS_KEY_ID.sub(MASK, text)
        text = _PRESIGNED.sub(lambda m: f"{m.group(1)}?{MASK}", text)
        text = _HEADER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)
        text = _SCHEME_CREDENTIAL.sub(lambda m: f"{m.group(1)} {MASK}", text)
        text = _QUERY.sub(lambda m: f"{m.group(1)}{MASK}", text)
        text = _NAMED_QUOTED.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}{m.group(2)}", text)
        text = _NAMED.sub(lambda m: f"{m.group(1)}{MASK}", text)
        return _PEM_PRIVATE.sub(MASK, text)

    def redact(self, value: Any, key: str = "") -> Any:
        if key and SECRET_NAME.search(key) and value not in (None, "", True, False):
            return MASK
        if value is None or isinstance(value, (bool, int, float)):
            return value
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self.redact_text(bytes(value).decode("utf-8", "replace"))
        if isinstance(value, dict):
            return {self.redact_text(k) if isinstance(k, str) else k: self.redact(v, str(k))
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return self._redact_args(value)
        if isinstance(value, (set, frozenset)):
            return sorted((self.redact(v) for v in value), key=str)
        # Exceptions, paths, dataclasses, SDK objects: their text, which a renderer would print.
        return self.redact_text(str(value))

    def _redact_args(self, items: Iterable[Any]) -> list:
        out: list = []
        masked_next = False
        for item in items:
            if masked_next:
                out.append(MASK)
            elif isinstance(item, str) and "=" in item and item.split("=", 1)[0] in _SECRET_OPTIONS:
                out.append(item.split("=", 1)[0] + "=" + MASK)
            elif isinstance(item, str) and item.startswith("-u") and len(item) > 2:
                out.append("-u" + MASK)  # curl -uuser:password
            else:
                out.append(self.redact(item))
            masked_next = isinstance(item, str) and item in _SECRET_OPTIONS
        return out

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        for key in list(event):
            event[key] = self.redact(event[key], "" if key == "event" else key)
        return event


class RedactedStream:
    """A text stream whose writes are redacted first: what the commands print (stdout)."""

    def __init__(self, stream: TextIO, redactor: Redactor) -> None:
        self._stream, self._redactor = stream, redactor

    def write(self, text: str) -> int:
        self._stream.write(self._redactor.redact_text(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def log_thread_crash(args: Any) -> None:
    """threading.excepthook: a thread's uncaught exception as a redacted log line, not as the
    raw traceback Python prints to stderr."""
    structlog.get_logger("quay_bootstrap").error(
        "thread.crashed", thread=getattr(args.thread, "name", None),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _text_exception(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    # Render tracebacks to text BEFORE redaction so secrets in exception messages are masked too.
    return structlog.processors.format_exc_info(logger, method, event)


def configure(redactor: Redactor, *, level: str = "info", fmt: str = "auto",
              stream: Optional[TextIO] = None) -> None:
    """Configure structlog and the stdlib root logger once, at the CLI's edge.

    Args:
        redactor: the processor that masks secrets; every line passes through it.
        level: debug, info, warning or error.
        fmt: json, console, or auto (console on a TTY, JSON lines otherwise, e.g. under systemd).
        stream: where lines go (stderr by default).
    """
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    numeric = getattr(logging, level.upper())
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _text_exception,
        redactor,
    ]
    renderer: Any = (structlog.dev.ConsoleRenderer(colors=stream.isatty())
                     if fmt == "console" else structlog.processors.JSONRenderer(sort_keys=False))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # The SDKs log request and response bodies (conf/stack contents) at debug: keep them quiet
    # even when the agent itself runs at debug level.
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "google", "docker"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
