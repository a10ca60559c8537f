"""Durations and sizes as operators write them ("30s", "1h30m", "64MiB"), read into numbers."""
from __future__ import annotations

import math
import re
from typing import Any

# Longer than any sensible timeout or interval, and short enough for every clock and socket API
# (socket.settimeout and Event.wait overflow near 9.2e9 s).
MAX_DURATION = 366 * 86400
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = re.compile(r"(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?", re.IGNORECASE)
_SIZE_FACTOR = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
                "gb": 1000**3, "gib": 1024**3}


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as "30s", "5m", "1h30m", "250ms"."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m, 1h or a number of seconds")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            pos, seconds = 0, 0.0
            for match in _DURATION.finditer(text):
                if match.start() != pos:
                    break
                seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
                pos = match.end()
            if pos != len(text) or pos == 0:
                raise ValueError(
                    f"{value!r} is not a duration; write e.g. 30s, 5m, 1h or a number of seconds"
                ) from None
    else:
        raise ValueError("expected a duration such as 30s, 5m, 1h or a number of seconds")
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is not a finite duration")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    if seconds > MAX_DURATION:
        raise ValueError(f"{value!r} is longer than a year; write a shorter duration")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from an integer or a string such as "64MiB" or "500 KB"."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 64MiB or a number of bytes")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE.fullmatch(value.strip())
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 64MiB, 500KB or a number of bytes")
        size = int(match.group(1)) * _SIZE_FACTOR[(match.group(2) or "b").lower()]
    else:
        raise ValueError("expected a size such as 64MiB or a number of bytes")
    if size <= 0:
        raise ValueError("a size must be positive")
    return size
