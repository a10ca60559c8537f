"""stack.settle: files copied by hand are taken only once two listings `settle` apart agree."""
from __future__ import annotations

import pytest

from quay_bootstrap.errors import Unavailable
from quay_bootstrap.stack.fetch import Fetcher
from quay_bootstrap.stack.plan import Limits
from quay_bootstrap.stack.store import StackStore
from quay_bootstrap.stores.file import FileSource
from tests.testbed.stacks import sample_stack


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fetcher(tmp_path, during_settle, clock, deadline=60.0) -> Fetcher:
    """A fetch from a folder; DURING_SETTLE(n) runs at the n-th settle wait (an upload going on)."""
    waits = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        clock.now += seconds
        during_settle(len(waits))

    made = Fetcher(FileSource(f"file://{tmp_path / 'source'}"), StackStore(tmp_path / "stack", None),
                   Limits(100, 1 << 20), concurrency=2, deadline=deadline, sleep=sleep,
                   clock=clock, settle=5.0)
    made.waits = waits
    return made


def upload(tmp_path, files) -> None:
    for key, data in files.items():
        path = tmp_path / "source" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def live(tmp_path) -> dict:
    folder = (tmp_path / "stack" / "current").resolve()
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_an_upload_still_running_is_taken_once_it_stops_changing(tmp_path):
    files = sample_stack()
    half = dict(list(files.items())[:5])
    upload(tmp_path, half)  # the copy has begun: config.yaml without the rest
    rest = {k: v for k, v in files.items() if k not in half}
    result = fetcher(tmp_path, lambda n: n == 1 and upload(tmp_path, rest), Clock()).fetch()
    assert result.changed and live(tmp_path) == files


def test_a_stable_listing_waits_one_settle_and_an_unchanged_one_none(tmp_path):
    upload(tmp_path, sample_stack())
    first = fetcher(tmp_path, lambda n: None, Clock())
    assert first.fetch().changed and first.waits == [5.0]
    again = fetcher(tmp_path, lambda n: None, Clock())
    assert not again.fetch().changed and again.waits == []


def test_files_that_never_stop_changing_end_in_unavailable_and_the_live_stack_stays(tmp_path):
    upload(tmp_path, sample_stack())
    fetcher(tmp_path, lambda n: None, Clock()).fetch()
    before = live(tmp_path)
    upload(tmp_path, {"extra.txt": b"0"})  # a copy that goes on and on
    churn = fetcher(tmp_path, lambda n: upload(tmp_path, {"extra.txt": str(n).encode()}), Clock(),
                    deadline=30.0)
    with pytest.raises(Unavailable, match="kept changing") as err:
        churn.fetch()
    assert "quay-bootstrap publish" in err.value.hint
    assert live(tmp_path) == before
