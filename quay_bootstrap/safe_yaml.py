"""YAML for untrusted documents (the agent config, Quay's config.yaml, the cluster lock): safe
types only, bounded nesting and alias expansion, and errors that never quote the document."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple, Union

import yaml

# Quay's config.yaml nests about 5 levels; anything near these limits is a mistake or an attack.
# Both count what the document becomes with every alias expanded: a "billion laughs" of 330
# bytes expands to 10^9 values, one 1 MB string aliased 20,000 times to 20 GB, and every walk of
# the result (the secrets scan, JSON for /status) pays for all of it.
MAX_DEPTH = 64
MAX_NODES = 100_000
MAX_CHARS = 16 * 1024 * 1024

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LimitError(yaml.YAMLError):
    """A document over MAX_DEPTH or MAX_NODES; `problem_mark` is where, like YAML's own errors."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


def load(text: Union[str, bytes]) -> Any:
    """Parse one YAML document with SafeLoader's types after checking its shape.

    Raises:
        yaml.YAMLError: the text is not YAML, or it is over the limits (LimitError).
        UnicodeDecodeError: bytes that are not UTF-8.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    _check_shape(text)
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader


def _check_shape(text: str) -> None:
    # Walks the event stream, which needs no recursion, so deep nesting cannot overflow the
    # stack before it is refused. Running totals count the document with aliases expanded: an
    # alias adds the size (values, characters, depth) of the node it names.
    sizes: Dict[str, Tuple[int, int, int]] = {}  # anchor -> (values, characters, depth)
    open_: List[List[Any]] = []  # [values at its start, characters at its start, depth below, anchor]
    values = chars = 0
    for event in yaml.parse(text, Loader=_Loader):
        depth = 0
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            open_.append([values, chars, 0, event.anchor])
            values += 1
            _limit(len(open_) > MAX_DEPTH, f"nested more than {MAX_DEPTH} levels deep", event)
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            start_values, start_chars, below, anchor = open_.pop()
            depth = below + 1
            if anchor:
                sizes[anchor] = (values - start_values, chars - start_chars, depth)
        elif isinstance(event, yaml.ScalarEvent):
            values += 1
            chars += len(event.value)
            if event.anchor:
                sizes[event.anchor] = (1, len(event.value), 0)
        elif isinstance(event, yaml.AliasEvent):
            # An alias to a node still open would make the document contain itself.
            _limit(any(entry[3] == event.anchor for entry in open_),
                   "an alias refers to a node that contains it", event)
            _limit(event.anchor not in sizes, "an alias names no anchor before it", event)
            more_values, more_chars, depth = sizes[event.anchor]
            values += more_values
            chars += more_chars
        else:
            continue
        if open_:
            open_[-1][2] = max(open_[-1][2], depth)
        _limit(len(open_) + depth > MAX_DEPTH, f"nested more than {MAX_DEPTH} levels deep "
               "(with aliases expanded)", event)
        _limit(values > MAX_NODES, f"holds more than {MAX_NODES} values, aliases expanded", event)
        _limit(chars > MAX_CHARS, f"holds more than {MAX_CHARS // 2**20} MiB of text, aliases "
               "expanded", event)


def _limit(broken: bool, problem: str, event: Any) -> None:
    if broken:
        raise LimitError(problem, event.start_mark)


def where(err: Exception, text: Union[str, bytes]) -> str:
    """Where a YAML error is, as "line N, column M (key KEY)", never its text: YAML's own
    message quotes the document ("found undefined alias 'R0tSuperSecret99'"), and a document
    that does not parse has had no secret registered for redaction yet. KEY is the last mapping
    key the parser read before the error (a name, not a value)."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return "(no position)"
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    key = _last_key_before(text, mark.index)
    what = f" ({err.problem})" if isinstance(err, LimitError) else ""
    return f"line {mark.line + 1}, column {mark.column + 1}" + (
        f" (key {key})" if key else "") + what


def _last_key_before(text: str, index: int) -> Optional[str]:
    # Replays the events up to the error: in a mapping, every other scalar is a key.
    stack: List[List[Any]] = []  # [is a mapping, scalars and nodes seen]
    key = None
    try:
        for event in yaml.parse(text, Loader=_Loader):
            if event.start_mark.index >= index:
                break
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                stack.pop()
                continue
            is_key = bool(stack) and stack[-1][0] and stack[-1][1] % 2 == 0
            if is_key and isinstance(event, yaml.ScalarEvent):
                key = event.value
            if stack and isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent,
                                            yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack[-1][1] += 1
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                stack.append([isinstance(event, yaml.MappingStartEvent), 0])
    except yaml.YAMLError:
        pass
    if key is None or not _KEY.fullmatch(key):
        return None
    return key


_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
