"""Google Cloud Storage (google-cloud-storage, application default credentials): stack source and leases."""
from __future__ import annotations

import base64
import os
from typing import TYPE_CHECKING, List, Optional, Tuple

import google.api_core.exceptions as gexc
import google.auth.exceptions
import requests
import requests.adapters
from google.cloud import storage

from quay_bootstrap.errors import CorruptDownload, SourceError, TransientError
from quay_bootstrap.stores import SMALL_OBJECT, BoundedBuffer, Download, ObjectInfo, split_bucket_url

if TYPE_CHECKING:
    from quay_bootstrap.config import StackConfig

_TIMEOUT = (5, 30)  # connect, read: seconds
_TRANSIENT = (gexc.TooManyRequests, gexc.InternalServerError, gexc.BadGateway,
              gexc.ServiceUnavailable, gexc.GatewayTimeout, gexc.RequestRangeNotSatisfiable,
              requests.exceptions.ConnectionError, requests.exceptions.Timeout,
              requests.exceptions.ChunkedEncodingError, google.auth.exceptions.TransportError)


def client(url: str, stack: Optional["StackConfig"], concurrency: int = 16) -> storage.Client:
    """A GCS client with the stack's endpoint and a connection pool for `concurrency` parallel
    downloads; the source and the leases both use this. STORAGE_EMULATOR_HOST is honoured, as by
    every Google client.

    Raises:
        SourceError: no application default credentials (`url` is where it says it happened).
    """
    endpoint_url = stack.endpoint_url if stack else None
    options = {"api_endpoint": endpoint_url} if endpoint_url else None
    # google-cloud-storage 3.x fetches each bucket's metadata in a thread of its own, only to
    # label trace spans (tracing is off): an extra request and thread, and storage.buckets.get,
    # which the node's role need not have.
    os.environ.setdefault("DISABLE_GCS_PYTHON_CLIENT_OTEL_BUCKET_METADATA", "true")
    try:
        made = storage.Client(client_options=options)
    except google.auth.exceptions.DefaultCredentialsError as err:
        raise SourceError("no Google credentials found to read the stack", where=url,
                          hint="Give the VM a service account that may read the bucket, "
                               "or set GOOGLE_APPLICATION_CREDENTIALS") from err
    # requests keeps 10 connections per host by default; parallel downloads beyond that
    # would open and discard a connection each time (and warn about it).
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=concurrency)
    for prefix in ("https://", "http://"):
        made._http.mount(prefix, adapter)
    return made


class GCSSource:
    """A prefix in a GCS bucket holding conf/stack."""

    def __init__(self, url: str, client: storage.Client) -> None:
        self.url = url
        self.bucket_name, self.prefix = split_bucket_url(url)
        self.client = client
        self._bucket = client.bucket(self.bucket_name)

    def list(self, limit: Optional[int] = None) -> List[ObjectInfo]:
        objects: List[ObjectInfo] = []
        try:
            # retry=None: the fetch retries with its own deadline.
            for blob in self.client.list_blobs(self.bucket_name, prefix=self.prefix or None,
                                                timeout=_TIMEOUT, retry=None):
                if limit is not None and len(objects) > limit:
                    break  # pages are asked for as the loop goes: no further one is
                key = blob.name[len(self.prefix):]
                if not key or key.endswith("/"):
                    continue
                checksums = {}
                if blob.md5_hash:
                    checksums["md5"] = base64.b64decode(blob.md5_hash).hex()
                if blob.crc32c:
                    checksums["crc32c"] = base64.b64decode(blob.crc32c).hex()
                objects.append(ObjectInfo(key=key, size=int(blob.size or 0),
                                          token=str(blob.generation), checksums=checksums))
        except Exception as err:  # noqa: BLE001 - classified below, re-raised otherwise
            mapped = self._classify(err, self.url)
            if mapped is err:
                raise
            raise mapped from err
        return objects

    def read(self, obj: ObjectInfo) -> Download:
        name = self.prefix + obj.key
        # Pinning the listed generation makes a concurrent overwrite a 404, never mixed content.
        blob = self._bucket.blob(name, generation=int(obj.token) if obj.token.isdigit() else None)
        where = f"gs://{self.bucket_name}/{name}"
        # The body streams into a buffer that refuses to grow past the listed size, so a store
        # sending more is stopped within one chunk (8 KiB) of it. No Range: a ranged read would
        # hide a longer object, and BlobReader reads ranges.
        buffer = BoundedBuffer(obj.size, where)
        try:
            blob.download_to_file(buffer, timeout=_TIMEOUT, checksum=None, retry=None)
        except CorruptDownload:
            raise
        except Exception as err:  # noqa: BLE001 - classified below, re-raised otherwise
            mapped = self._classify(err, where, reading=True)
            if mapped is err:
                raise
            raise mapped from err
        return Download(data=buffer.getvalue())

    def secrets(self) -> List[str]:
        # google-auth's access tokens live an hour and are never logged at warning; the
        # service account's key file, if any, is never read into the agent's log.
        return []

    def get(self, key: str) -> bytes:
        name = self.prefix + key
        where = f"gs://{self.bucket_name}/{name}"
        try:
            return _download_small(self._bucket.blob(name), where)
        except gexc.NotFound as err:
            raise SourceError("the object does not exist", where=where, hint="Check the URL") from err
        except Exception as err:  # noqa: BLE001 - classified below, re-raised otherwise
            mapped = self._classify(err, where)
            if mapped is err:
                raise
            raise mapped from err

    def _classify(self, err: Exception, where: str, reading: bool = False) -> Exception:
        if isinstance(err, gexc.NotFound):
            if reading:
                return TransientError(f"{where} changed while it was being fetched")
            return SourceError(f"the bucket {self.bucket_name!r} does not exist", where=where,
                               hint="Check stack.source")
        if isinstance(err, (gexc.Forbidden, gexc.Unauthorized)):
            return SourceError(f"access denied to the stack ({err.code})", where=where,
                               hint="Check that the VM's service account has "
                                    "storage.objects.list and storage.objects.get on the bucket")
        if isinstance(err, gexc.PreconditionFailed):
            return TransientError(f"{where} changed while it was being fetched")
        if isinstance(err, _TRANSIENT):
            return TransientError(f"{where}: {err}")
        if isinstance(err, gexc.GoogleAPICallError):
            return SourceError(f"the object store refused the request: {err}", where=where)
        return err


class GCSLeases:
    """Lease objects under a prefix, written with GCS generation preconditions."""

    def __init__(self, url: str, client: storage.Client) -> None:
        self.url = url
        bucket, self.prefix = split_bucket_url(url)
        self.bucket = client.bucket(bucket)

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        blob = self.bucket.blob(self.prefix + key)
        try:
            data = _download_small(blob, f"gs://{self.bucket.name}/{self.prefix}{key}")
        except gexc.NotFound:
            return None
        return data, str(blob.generation)

    def create(self, key: str, data: bytes) -> bool:
        return self._put(key, data, 0)

    def replace(self, key: str, data: bytes, token: str) -> bool:
        return self._put(key, data, int(token))

    def delete(self, key: str) -> None:
        try:
            self.bucket.blob(self.prefix + key).delete(timeout=_TIMEOUT, retry=None)
        except gexc.NotFound:
            pass

    def _put(self, key: str, data: bytes, generation: int) -> bool:
        try:
            self.bucket.blob(self.prefix + key).upload_from_string(
                data, if_generation_match=generation, timeout=_TIMEOUT, retry=None)
            return True
        except gexc.PreconditionFailed:
            return False


# What the registry in stores/__init__.py looks up.
Source, Leases = GCSSource, GCSLeases


def _download_small(blob: storage.Blob, where: str) -> bytes:
    """An object read by key (the lock, a lease), at most SMALL_OBJECT bytes; the client
    checks its checksum."""
    buffer = BoundedBuffer(SMALL_OBJECT, where)
    try:
        blob.download_to_file(buffer, timeout=_TIMEOUT, retry=None)
    except CorruptDownload as err:
        raise SourceError(f"the object is larger than {SMALL_OBJECT} bytes, far more than an "
                          "image lock or a lease record holds", where=where,
                          hint="Check the URL names the right object (and that "
                               "STORAGE_EMULATOR_HOST or stack.endpoint_url, if set, name the "
                               "store you meant)") from err
    return buffer.getvalue()
