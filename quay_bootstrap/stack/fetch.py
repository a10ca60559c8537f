"""Fetch conf/stack: list, plan, download in parallel, verify, validate, then switch atomically."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Dict, Mapping, Optional, Tuple

import structlog
import tenacity

from quay_bootstrap.errors import (
    ConfigError,
    CorruptDownload,
    QuayBootstrapError,
    SourceError,
    TransientError,
    Unavailable,
)
from quay_bootstrap.stack import published
from quay_bootstrap.stack.plan import Limits, ManifestEntry, checksum_mismatch, plan_fetch, stack_version
from quay_bootstrap.stack.store import StackStore
from quay_bootstrap.stack.validate import StackCheck, check_stack
from quay_bootstrap.stores import ObjectInfo, StackSource

log = structlog.get_logger(__name__)

CHECKSUM_ATTEMPTS = 3


@dataclass(frozen=True)
class FetchResult:
    """What a fetch did. `changed` is False when the store held the live version already."""

    version: str
    previous: Optional[str]
    changed: bool
    files: int
    bytes: int
    downloaded: int
    reused: int
    seconds: float
    path: Path


@dataclass
class Fetcher:
    """Args:
        source: where the stack lives.
        store: the stack folder (entered, i.e. locked, by `fetch`).
        limits: max files and bytes.
        concurrency: parallel downloads.
        deadline: seconds to keep retrying transient faults before giving up with exit 69.
        add_secrets: called with the secrets found in the new config.yaml before anything is
            logged about it (the log redactor's `add`).
        sleep, clock: injected so tests and the daemon's stop event control waiting.
        container_env: the environment Quay will run with (it may hold settings).
    """

    source: StackSource
    store: StackStore
    limits: Limits
    concurrency: int = 16
    deadline: float = 120.0
    keep_versions: int = 3
    add_secrets: Callable = lambda values: None
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    container_env: Mapping[str, str] = field(default_factory=dict)
    # The `.published` prefix beside the source (stack/published.py): a pointer there wins over
    # the files under the source. None: hand-uploaded stacks only.
    published: Optional[object] = None
    verify_key: Optional[bytes] = None  # stack.verify_key: only signed publications apply
    # stack.settle: a hand-uploaded change is taken only once a second listing this many
    # seconds later shows exactly the same objects (an upload still running changes it).
    settle: float = 0.0

    def fetch(self) -> FetchResult:
        """Bring the live stack up to date with the source.

        Raises:
            SourceError: the store said no (missing bucket, denied, unsafe key, over limits,
                checksums never matched); exit 1.
            Unavailable: transient faults outlasted the deadline; exit 69.
            ConfigError: the new stack failed validation; exit 78.
            In every case the live stack (`current`) is left exactly as it was.
        """
        started = self.clock()
        give_up_at = started + self.deadline
        with self.store:
            previous = self.store.current()
            if self.published is not None:
                pointer = self._retrying(give_up_at, published.read_pointer, self.published)
                if pointer is not None:
                    return self._fetch_published(pointer, previous, give_up_at, started)
            if self.verify_key is not None:
                raise SourceError("stack.verify_key is set, and nothing is published: refusing "
                                  "the files under stack.source, which carry no signature",
                                  where=published.published_url(self.source.url),
                                  hint="Publish the stack with `quay-bootstrap publish --sign "
                                       "KEY`; the live stack was left in place")
            objects = self._retrying(give_up_at, self.source.list, self.limits.max_files)
            if len(objects) > self.limits.max_files:
                raise SourceError(f"the stack has more than stack.max_files "
                                  f"({self.limits.max_files}) files; the listing stopped there",
                                  where=self.source.url,
                                  hint="Check that stack.source names the conf/stack prefix, "
                                       "not a larger one, or raise stack.max_files")
            rejected = self.store.rejected_listing({o.key: o.token for o in objects})
            if rejected and previous:
                log.info("stack.still_rejected", version=rejected[:12], live=previous[:12],
                         note="Quay was not healthy on it; fetched again once the source "
                              "changes")
                return FetchResult(previous, previous, False, len(objects), 0, 0, 0,
                                   self.clock() - started, self.store.path(previous))
            plan = plan_fetch(self.source.url, objects, self.limits,
                              self.store.manifest(previous))
            if self.settle > 0 and not (plan.unchanged and previous):
                objects = self._settled(objects, give_up_at)
                plan = plan_fetch(self.source.url, objects, self.limits,
                                  self.store.manifest(previous))
            if plan.unchanged and previous:
                log.debug("stack.unchanged", version=previous, files=len(plan.objects))
                return FetchResult(previous, previous, False, len(plan.objects), plan.total_bytes,
                                   0, len(plan.reuse), self.clock() - started,
                                   self.store.path(previous))
            staging = self.store.new_staging()
            try:
                return self._stage_and_commit(plan, previous, staging, give_up_at, started)
            except OSError as err:
                if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise QuayBootstrapError(
                    "no space left on the disk while staging conf/stack", where=str(staging),
                    hint="Free space under stack.dir; the live stack was left in place") from err
            finally:
                shutil.rmtree(staging, ignore_errors=True)

    def _stage_and_commit(self, plan, previous, staging, give_up_at, started) -> FetchResult:
        manifest: Dict[str, ManifestEntry] = {}
        old_manifest = self.store.manifest(previous)
        for obj in plan.reuse:
            try:
                data = (self.store.path(previous) / obj.key).read_bytes()
            except OSError:
                data = b""
            sha = hashlib.sha256(data).hexdigest()
            if sha != old_manifest[obj.key].sha256:  # the local copy was lost or altered
                data, sha = self._download(obj, give_up_at)
            self.store.write_file(staging, obj.key, data)
            manifest[obj.key] = ManifestEntry(obj.size, obj.token, sha)

        def one(obj: ObjectInfo) -> None:
            data, sha = self._download(obj, give_up_at)
            self.store.write_file(staging, obj.key, data)
            manifest[obj.key] = ManifestEntry(obj.size, obj.token, sha)

        with ThreadPoolExecutor(max_workers=self.concurrency,
                                thread_name_prefix="stack-fetch") as pool:
            futures = [pool.submit(one, obj) for obj in plan.download]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in done:
                future.result()  # re-raises the first failure

        version = stack_version((k, v.sha256) for k, v in manifest.items())
        if version == previous:
            # Same content under new tokens (re-uploaded): nothing on disk changes but the
            # manifest, so the next refresh does not download it again.
            self.store.write_manifest(version, manifest, self.source.url)
            return self._result(version, previous, False, plan, started)
        pruned = self._check_and_commit(staging, version, manifest, self.source.url)
        result = self._result(version, previous, True, plan, started)
        log.info("stack.applied", version=version, previous=previous, files=result.files,
                 bytes=result.bytes, downloaded=result.downloaded, reused=result.reused,
                 pruned=pruned, seconds=round(result.seconds, 3))
        return result

    def _settled(self, objects, give_up_at: float):
        """The listing once two listings `settle` seconds apart agree (same keys, same tokens):
        files copied by hand are taken only after the copy has stopped changing them."""
        def tokens(listed):
            return sorted((o.key, o.token) for o in listed)

        while True:
            self.sleep(self.settle)
            again = self._retrying(give_up_at, self.source.list, self.limits.max_files)
            if tokens(again) == tokens(objects):
                return again
            if self.clock() >= give_up_at:
                raise Unavailable(f"the files under stack.source kept changing for "
                                  f"{self.deadline:.0f}s (stack.retry_deadline): an upload still "
                                  "running?", where=self.source.url,
                                  hint="Wait for the upload to finish, or publish with "
                                       "`quay-bootstrap publish`, which nodes see all at once; "
                                       "the live stack was left in place")
            log.info("stack.settling", files=len(again), settle=self.settle,
                     note="the listing changed meanwhile; waiting for it to stay the same")
            objects = again

    def _fetch_published(self, pointer, previous, give_up_at, started) -> FetchResult:
        """Exactly the version the pointer names: its bundle in one read, every file checked
        against the manifest, signed when stack.verify_key says so; validated as any stack."""
        where = f"{self.published.url}/{published.POINTER}"
        if self.verify_key is not None:
            published.verify(pointer, self.verify_key, where)
            self._no_replay(pointer, where)
        size = sum(1 for _ in pointer.manifest)
        tokens = {key: f"published:{pointer.version}" for key in pointer.manifest}
        rejected = self.store.rejected_listing(tokens)
        if pointer.version == previous or (rejected and previous):
            if rejected:
                log.info("stack.still_rejected", version=rejected[:12], live=previous[:12],
                         note="Quay was not healthy on it; fetched again once another "
                              "version is published")
            else:
                log.debug("stack.unchanged", version=previous, published=pointer.serial)
            return FetchResult(previous, previous, False, size, 0, 0, 0, self.clock() - started,
                               self.store.path(previous))
        files = self._retrying(give_up_at, published.read_bundle, self.published, pointer,
                               self.limits)
        manifest = {key: ManifestEntry(len(data), tokens[key], pointer.manifest[key])
                    for key, data in files.items()}
        staging = self.store.new_staging()
        try:
            for key, data in files.items():
                self.store.write_file(staging, key, data)
            pruned = self._check_and_commit(staging, pointer.version, manifest, where)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        total = sum(len(data) for data in files.values())
        log.info("stack.applied", version=pointer.version, previous=previous,
                 published=pointer.serial, by=pointer.published_by, files=len(files),
                 bytes=total, pruned=pruned, seconds=round(self.clock() - started, 3))
        return FetchResult(pointer.version, previous, True, len(files), total, len(files), 0,
                           self.clock() - started, self.store.path(pointer.version))

    def _no_replay(self, pointer, where: str) -> None:
        """A signed pointer older (a lower serial) than one this node has verified is refused:
        someone who may write the bucket but not sign could otherwise put an old signed
        pointer back (a rollback publishes a new serial). The highest serial seen is kept in
        stack.dir."""
        path = self.store.root / "published-serial"
        try:
            seen = int(path.read_text())
        except (OSError, ValueError):
            seen = 0
        if pointer.serial < seen:
            raise SourceError(f"refusing serial {pointer.serial} (version {pointer.version[:12]}): "
                              f"this node has verified serial {seen}, so this is an older "
                              "signed pointer put back", where=where,
                              hint="Publish the version wanted anew (`quay-bootstrap rollback "
                                   "VERSION --sign KEY`); if the store was deliberately reset, "
                                   f"remove {path} on the nodes. The live stack was left in place")
        if pointer.serial > seen:
            tmp = path.with_name(".published-serial.tmp")
            tmp.write_text(str(pointer.serial))
            os.replace(tmp, path)

    def _check_and_commit(self, staging, version, manifest, where) -> list:
        """Validate the staged stack as Quay will, then make it live; the versions pruned."""
        config = staging / "config.yaml"
        checked = check_stack(list(manifest), config.read_bytes() if config.is_file() else None,
                              lambda name: (staging / name).read_bytes(), self.container_env)
        self.add_secrets(checked.secrets)
        # Operators debugging a node want to see the settings that go live; the redactor
        # masks the secrets among them.
        log.debug("stack.settings", version=version, settings=checked.settings)
        _report(checked, where)
        self.store.commit(staging, version, manifest, where)
        return self.store.prune(self.keep_versions)

    def _result(self, version, previous, changed, plan, started) -> FetchResult:
        return FetchResult(version, previous, changed, len(plan.objects), plan.total_bytes,
                           len(plan.download), len(plan.reuse), self.clock() - started,
                           self.store.path(version))

    def _download(self, obj: ObjectInfo, give_up_at: float) -> Tuple[bytes, str]:
        def attempt() -> Tuple[bytes, str]:
            try:
                got = self._retrying(give_up_at, self.source.read, obj)
            except CorruptDownload as err:
                log.warning("stack.checksum_mismatch", key=obj.key, problem=str(err))
                raise
            problem, _ = checksum_mismatch(got.data, obj, got.checksums)
            if problem:
                log.warning("stack.checksum_mismatch", key=obj.key, problem=problem)
                raise CorruptDownload(problem)
            return got.data, hashlib.sha256(got.data).hexdigest()

        try:
            for tried in tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type(CorruptDownload),
                    stop=tenacity.stop_after_attempt(CHECKSUM_ATTEMPTS),
                    wait=tenacity.wait_exponential(multiplier=0.2, max=2),
                    sleep=self.sleep, reraise=True):
                with tried:
                    return attempt()
        except CorruptDownload as err:
            raise SourceError(f"refusing the whole stack: {obj.key!r} did not match the store's "
                              f"listing or checksum after {CHECKSUM_ATTEMPTS} downloads ({err})",
                              where=self.source.url,
                              hint="Check the object in the store (re-upload it); a proxy, "
                                   "disk or store may be corrupting data or sending other "
                                   "bytes than it lists") from err
        raise AssertionError("unreachable")  # pragma: no cover

    def _retrying(self, give_up_at: float, call, *args):
        """Run `call`, retrying transient faults with jittered backoff until the deadline."""
        try:
            for tried in tenacity.Retrying(
                    retry=tenacity.retry_if_exception_type(TransientError),
                    stop=lambda state: self.clock() >= give_up_at,
                    wait=tenacity.wait_random_exponential(multiplier=0.5, max=15),
                    sleep=self.sleep, reraise=True,
                    before_sleep=_log_retry):
                with tried:
                    return call(*args)
        except TransientError as err:
            raise Unavailable(f"the object store did not answer within {self.deadline:.0f}s: "
                              f"{err}", where=self.source.url,
                              hint="Check the network path and stack.endpoint_url; the live "
                                   "stack was left in place") from err
        raise AssertionError("unreachable")  # pragma: no cover


def _log_retry(state: tenacity.RetryCallState) -> None:
    log.warning("source.retry", attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else "",
                wait=round(state.next_action.sleep, 2) if state.next_action else None)


def _report(checked: StackCheck, url: str) -> None:
    for where, what in checked.warnings:
        log.warning("stack.warning", where=where, problem=what)
    if not checked.ok:
        raise ConfigError(f"the conf/stack in the store is invalid ({len(checked.errors)} "
                          "problem(s)); it was not applied", where=url,
                          hint="Fix it in the store; the live stack was left in place",
                          problems=checked.errors)


def check_local_stack(folder: Path, environ: Mapping[str, str] = MappingProxyType({})) -> StackCheck:
    """Validate a conf/stack folder on disk (for `quay-bootstrap validate --stack`)."""
    if not folder.is_dir():
        raise SourceError("not a directory", where=str(folder))
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    config = folder / "config.yaml"
    return check_stack(names, config.read_bytes() if config.is_file() else None,
                       lambda name: (folder / name).read_bytes(), environ)
