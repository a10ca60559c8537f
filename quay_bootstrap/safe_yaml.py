"""YAML for untrusted documents (the agent config, Quay's config.yaml, the cluster lock): safe
types only, bounded nesting and alias expansion, and errors that never quote the document."""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Union

import yaml

# Quay's config.yaml nests about 5 levels; anything near these limits is a mistake or an attack.
MAX_DEPTH = 64
# Nodes counted with every alias expanded: a "billion laughs" document of 330 bytes expands to
# 10^9 nodes, and each walk of it (the secrets scan, JSON for /status) pays for all of them.
MAX_NODES = 100_000

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
    # stack before it is refused. Each open collection sums its size; an alias adds the size of
    # the node it names, so expansion is counted without being done.
    sizes: Dict[str, int] = {}
    open_: List[List[Any]] = []  # [size, anchor]
    total = 0
    for event in yaml.parse(text, Loader=_Loader):
        size: Optional[int] = None
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            if len(open_) >= MAX_DEPTH:
                raise LimitError(f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
            open_.append([1, event.anchor])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            size, anchor = open_.pop()
            if anchor:
                sizes[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.AliasEvent):
            size = sizes.get(event.anchor, 1)  # an unknown alias fails in the loader, quietly
        if size is None:
            continue
        if open_:
            open_[-1][0] += size
        else:
            total += size
        if total + sum(entry[0] for entry in open_) > MAX_NODES:
            raise LimitError(f"expands to more than {MAX_NODES} values (YAML aliases)",
                             event.start_mark)


def where(err: Exception, text: Union[str, bytes]) -> str:
    """Where a YAML error is, as "line N, column M (key KEY)", never its text: YAML's own
    message quotes the document ("found undefined alias 'R0tSuperSecret99'"), and a document
    that does not parse has had no secret registered for redaction yet."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return "(no position)"
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    key = re.match(r"\s*-?\s*([A-Za-z0-9_.-]+)\s*:", line)
    what = f" ({err.problem})" if isinstance(err, LimitError) else ""
    return f"line {mark.line + 1}, column {mark.column + 1}" + (
        f" (key {key.group(1)})" if key else "") + what
