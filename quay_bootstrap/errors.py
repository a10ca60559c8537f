"""The agent's exceptions: one root, a subclass per thing the caller must do, one exit status each."""
from __future__ import annotations

from typing import Sequence

# Exit statuses (sysexits.h where one fits). The CLI is the only place that maps errors to them,
# and its help lists them from EXIT_STATUSES, so the table cannot drift from the code.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_LOCK = 65  # EX_DATAERR
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE
EXIT_CONFIG = 78  # EX_CONFIG


class QuayBootstrapError(Exception):
    """Root of every error the agent raises on purpose; catch this to catch them all.

    Attributes:
        message: one sentence saying what went wrong.
        where: the URL, path or key it happened at.
        hint: what the operator should do about it.
    """

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, *, where: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.message]
        if self.where:
            parts.append(f"(at {self.where})")
        text = " ".join(parts)
        if self.hint:
            text += f". {self.hint}"
        return text


class ConfigError(QuayBootstrapError):
    """The agent config or a conf/stack is invalid; carries every problem found, not only the first.

    Attributes:
        problems: (key path, what is wrong) pairs, in the order found.
    """

    exit_code = EXIT_CONFIG

    def __init__(self, message: str, *, where: str = "", hint: str = "",
                 problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message, where=where, hint=hint)
        self.problems = list(problems)

    def __str__(self) -> str:
        text = super().__str__()
        for path, what in self.problems:
            text += f"\n  - {path}: {what}" if path else f"\n  - {what}"
        return text


class LockViolation(QuayBootstrapError):
    """The image reference breaks the tag lock (floating tag, wrong digest)."""

    exit_code = EXIT_LOCK


class Unavailable(QuayBootstrapError):
    """A dependency (object store, registry, Docker) did not answer after retries."""

    exit_code = EXIT_UNAVAILABLE


class ImageError(QuayBootstrapError):
    """The registry answered, permanently no: bad credentials, no such tag, a full disk."""


class SourceError(QuayBootstrapError):
    """The object store answered, but permanently no: missing bucket, empty prefix, access denied,
    an unsafe key, a stack over its limits, a checksum that never matched."""


class ContainerError(QuayBootstrapError):
    """The Quay container could not be created, started or kept running."""


# --- internal signals: caught inside the agent, never shown to an operator as such ----------

class TransientError(Exception):
    """A fault worth retrying: a timeout, a refused connection, a 5xx, the object changing mid-fetch."""


class CorruptDownload(Exception):
    """The bytes did not match their checksum (or were cut short); download again."""


class Interrupted(Exception):
    """SIGTERM arrived while a pass was waiting to retry: give up the pass, leave Quay as is."""


EXIT_STATUSES = (
    (EXIT_OK, "ok"),
    (EXIT_FAILURE, "failure (see the message)"),
    (EXIT_USAGE, "usage error"),
    (LockViolation.exit_code, "the image reference breaks the tag lock"),
    (Unavailable.exit_code, "a dependency (object store, registry, Docker) did not answer "
                            "after retries"),
    (ConfigError.exit_code, "the agent config or conf/stack is invalid"),
)


def exit_status_table() -> str:
    """The `exit statuses:` block of `quay-bootstrap --help`."""
    return "exit statuses:\n" + "".join(f"  {code:<3} {what}\n" for code, what in EXIT_STATUSES)
