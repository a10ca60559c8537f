"""The stack folder: atomic switch, known-good link, pruning, crash leftovers, one fetch at a time."""
from __future__ import annotations

import os

import pytest

from quay_bootstrap.errors import QuayBootstrapError
from quay_bootstrap.stack.plan import ManifestEntry
from quay_bootstrap.stack.store import StackStore


def commit(store, version, files):
    staging = store.new_staging()
    for key, data in files.items():
        store.write_file(staging, key, data)
    store.commit(staging, version, {k: ManifestEntry(len(v), "t", "s") for k, v in files.items()},
                 "file:///src")


def test_switch_is_a_symlink_rename_and_versions_stay_immutable(tmp_path):
    with StackStore(tmp_path) as store:
        commit(store, "v1", {"config.yaml": b"one"})
        old = (tmp_path / "current").resolve()
        commit(store, "v2", {"config.yaml": b"two", "a/b.crt": b"c"})
        assert store.current() == "v2"
        assert (tmp_path / "current" / "a" / "b.crt").read_bytes() == b"c"
        assert (old / "config.yaml").read_bytes() == b"one"  # a running Quay keeps its files
        assert os.readlink(tmp_path / "current") == "versions/v2"
        assert store.manifest("v2")["a/b.crt"] == ManifestEntry(1, "t", "s")


def test_prune_never_removes_current_or_known_good(tmp_path):
    with StackStore(tmp_path) as store:
        commit(store, "v1", {"c": b"1"})
        store.mark_known_good("v1")
        for i in range(2, 7):
            commit(store, f"v{i}", {"c": str(i).encode()})
            os.utime(store.path(f"v{i}"), (i, 1000 + i))
        os.utime(store.path("v1"), (1, 1))
        assert store.prune(3) == ["v2", "v3"]
        assert sorted(p.name for p in store.versions.iterdir()) == ["v1", "v4", "v5", "v6"]
        assert store.known_good() == "v1" and store.current() == "v6"


def test_leftovers_of_a_killed_fetch_are_removed_on_the_next_run(tmp_path):
    with StackStore(tmp_path) as store:
        commit(store, "v1", {"c": b"1"})
        staging = store.new_staging()
        store.write_file(staging, "half", b"x")
    (tmp_path / ".link-current-999").symlink_to("versions/zzz")
    with StackStore(tmp_path) as store:
        assert not list(tmp_path.glob(".staging-*")) and not list(tmp_path.glob(".link-*"))
        assert store.current() == "v1"


def test_one_fetch_at_a_time(tmp_path):
    with StackStore(tmp_path):
        with pytest.raises(QuayBootstrapError, match="another quay-bootstrap is fetching"):
            with StackStore(tmp_path):
                pass


def test_a_dangling_current_link_means_no_live_version(tmp_path):
    with StackStore(tmp_path) as store:
        (tmp_path / "current").symlink_to("versions/gone")
        assert store.current() is None
        assert store.manifest(None) == {}


def test_a_rejection_survives_a_restart_and_names_the_listing_it_came_from(tmp_path):
    with StackStore(tmp_path) as store:
        commit(store, "v1", {"config.yaml": b"one"})
        commit(store, "v2", {"config.yaml": b"two"})
        store.reject("v2", "quay@sha256:new", "spec1")
        store.switch_current("v1")
    again = StackStore(tmp_path)  # the agent restarted
    assert again.is_rejected("v2", "quay@sha256:new", "spec1")
    assert not again.is_rejected("v2", "quay@sha256:other", "spec1")
    assert again.rejected_listing({"config.yaml": "t"}) == "v2"  # the same objects, same tokens
    assert again.rejected_listing({"config.yaml": "t2"}) is None  # the source changed
    assert oct((tmp_path / "rejected.json").stat().st_mode & 0o777) == "0o640"


def test_the_live_version_s_listing_is_not_called_rejected(tmp_path):
    """Only the image was at fault: the stack it ran on stays fetchable."""
    with StackStore(tmp_path) as store:
        commit(store, "v1", {"config.yaml": b"one"})
        store.reject("v1", "quay@sha256:bad", "spec1")
        assert store.rejected_listing({"config.yaml": "t"}) is None


def test_manifests_are_as_private_as_the_stack(tmp_path):
    with StackStore(tmp_path) as store:
        commit(store, "v1", {"config.yaml": b"one"})
    assert oct((tmp_path / "manifests" / "v1.json").stat().st_mode & 0o777) == "0o640"


@pytest.mark.parametrize("umask", [0o077, 0o000])
def test_modes_do_not_depend_on_the_umask(tmp_path, umask):
    """The unit runs with UMask=0077 and a debugging shell may have 0000: the stack's files are
    0640 and its folders 0750 either way, never world-readable."""
    saved = os.umask(umask)
    try:
        with StackStore(tmp_path) as store:
            commit(store, "v1", {"config.yaml": b"one", "extra/ca.crt": b"c"})
            store.reject("v1", "quay@sha256:bad", "spec1")
    finally:
        os.umask(saved)
    files = [tmp_path / "current" / "config.yaml", tmp_path / "current" / "extra" / "ca.crt",
             tmp_path / "manifests" / "v1.json", tmp_path / "rejected.json"]
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {"0o640"}
    folders = [tmp_path / "versions" / "v1", tmp_path / "current" / "extra", tmp_path / "versions",
               tmp_path / "manifests"]
    assert {oct(f.stat().st_mode & 0o777) for f in folders} == {"0o750"}
    assert oct((tmp_path / ".lock").stat().st_mode & 0o777) == "0o600"
