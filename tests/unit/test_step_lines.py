"""Which of a pass's step lines are news at info level (pipeline.Pass._news): all of a pass of
its own; in the daemon's refreshes (one cache), only what differs from the last pass, and a new
stack never (the fetch's `stack.applied` line tells it, once)."""
from __future__ import annotations

from types import SimpleNamespace as Value

import pytest

from quay_bootstrap.pipeline import Pass


def stack(version, changed=False):
    return Value(version=version, changed=changed)


def image(digest, pulled=False):
    return Value(digest=digest, pulled=pulled)


@pytest.mark.parametrize("name, values, news", [
    ("stack", [stack("v1", True), stack("v1"), stack("v1"), stack("v2", True), stack("v2")],
     [True, False, False, False, False]),
    ("stack", [stack("v1"), stack("v1", changed=True)], [True, False]),
    ("lock", [Value(ref="q:v3.9.0"), Value(ref="q:v3.9.0"), Value(ref="q:v3.10.0")],
     [True, False, True]),
    ("image", [image("sha256:a"), image("sha256:a"), image("sha256:a", pulled=True)],
     [True, False, True]),
    ("container", [Value(), Value()], [True, True]),  # only ever run for a change
    ("health", [Value(), Value()], [True, True]),
])
def test_a_refresh_repeating_the_last_pass_is_not_news(name, values, news):
    refreshes = Value(cache={})  # the daemon's: one cache for all its passes
    assert [Pass._news(refreshes, name, value) for value in values] == news


def test_a_pass_of_its_own_says_every_step():
    assert all(Pass._news(Value(cache={}), name, value) for name, value in
               [("stack", stack("v1")), ("lock", Value(ref="q:v3.9.0")), ("image", image("d"))])
