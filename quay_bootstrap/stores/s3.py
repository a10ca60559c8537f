"""S3 and S3-compatible stores (Ceph RGW, MinIO, Swift's S3 API) via botocore, boto3's engine: stack
source and leases. boto3 itself adds only what the agent never calls (resources, s3transfer's
managed uploads) and 0.045 s of imports to every start."""
from __future__ import annotations

import base64
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import botocore.config
import botocore.exceptions

from quay_bootstrap import aws_session
from quay_bootstrap.errors import CorruptDownload, SourceError, TransientError
from quay_bootstrap.stores import (
    SMALL_OBJECT,
    Download,
    ObjectInfo,
    check_not_longer,
    read_at_most,
    split_bucket_url,
)

if TYPE_CHECKING:
    from quay_bootstrap.config import StackConfig

_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
_DENIED = {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch",
           "InvalidToken", "ExpiredToken", "AccountProblem", "403"}
_CHANGED = {"PreconditionFailed", "NoSuchKey", "412", "404"}
_CONNECTION_FAULTS = (
    botocore.exceptions.ProxyConnectionError,
    botocore.exceptions.EndpointConnectionError,
    botocore.exceptions.ConnectTimeoutError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ConnectionClosedError,
)
# A body cut short: counted like a checksum mismatch (a few downloads, then refused).
_TRUNCATED = (botocore.exceptions.ResponseStreamingError, botocore.exceptions.IncompleteReadError)
_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "412"}


def client(url: str, stack: Optional["StackConfig"], concurrency: int = 16) -> Any:
    """An S3 client with the stack's endpoint, region and CA bundle; credentials from botocore's
    default chain (env, shared files, instance profile). The source and the leases both use this, so a store
    behind a private CA or a picky S3-compatible server works for both or for neither. Every
    client comes from the process's one session (`aws_session`)."""
    endpoint_url = stack.endpoint_url if stack else None
    region = stack.region if stack else None
    ca_bundle = str(stack.ca_bundle) if stack and stack.ca_bundle else None
    options: Dict[str, Any] = dict(
        max_pool_connections=concurrency,
        connect_timeout=5,
        read_timeout=30,
        # Callers retry with their own deadline; botocore's retries would multiply it.
        retries={"total_max_attempts": 1, "mode": "standard"},
        # S3-compatible stores rarely serve virtual-hosted bucket names.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    try:
        # Newer botocore sends request checksums that some S3-compatible stores reject;
        # we verify every object ourselves.
        config = botocore.config.Config(request_checksum_calculation="when_required",
                                        response_checksum_validation="when_required",
                                        **options)
    except TypeError:
        config = botocore.config.Config(**options)
    return aws_session.client("s3", endpoint_url=endpoint_url, region_name=region,
                              verify=ca_bundle, config=config)


class S3Source:
    """A prefix in an S3 bucket holding conf/stack."""

    def secrets(self) -> List[str]:
        return aws_session.credential_secrets()

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.bucket, self.prefix = split_bucket_url(url)
        self.client = client

    def list(self, limit: Optional[int] = None) -> List[ObjectInfo]:
        objects: List[ObjectInfo] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix)
            for page in pages:
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self.prefix):]
                    if not key or key.endswith("/"):
                        continue  # folder placeholders made by consoles
                    etag = item.get("ETag", "").strip('"')
                    checksums = {"md5": etag} if _MD5_ETAG.match(etag) else {}
                    objects.append(ObjectInfo(key=key, size=int(item["Size"]), token=etag,
                                              checksums=checksums))
                if limit is not None and len(objects) > limit:
                    break  # before the paginator asks for the next page
        except botocore.exceptions.ClientError as err:
            raise self._classify(err, "list") from err
        except _CONNECTION_FAULTS as err:
            raise TransientError(f"{self.url}: {err}") from err
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.SSLError) as err:
            raise _permanent(err, self.url) from err
        return objects

    def read(self, obj: ObjectInfo) -> Download:
        key = self.prefix + obj.key
        where = f"s3://{self.bucket}/{key}"
        try:
            # No Range header: a ranged GET of the listed size would hide a longer object (and
            # S3 sends no full-object checksum for a range). The whole object is asked for and
            # no more than one byte past the listed size is read.
            response = self.client.get_object(Bucket=self.bucket, Key=key,
                                               IfMatch=f'"{obj.token}"', ChecksumMode="ENABLED")
            data = _read_body(response, obj.size, where)
        except botocore.exceptions.ClientError as err:
            raise self._classify(err, "read", key) from err
        except _CONNECTION_FAULTS as err:
            raise TransientError(f"{where}: {err}") from err
        except botocore.exceptions.FlexibleChecksumError as err:
            raise CorruptDownload(str(err)) from err
        except _TRUNCATED as err:
            raise CorruptDownload(f"truncated download: {err}") from err
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.SSLError) as err:
            raise _permanent(err, where) from err
        checksums = {}
        sha256 = response.get("ChecksumSHA256") or ""
        if sha256 and "-" not in sha256:  # "-N" marks a composite multipart checksum
            checksums["sha256"] = base64.b64decode(sha256).hex()
        if response.get("ServerSideEncryption", "").startswith("aws:kms") or \
                response.get("SSECustomerAlgorithm"):
            # Under SSE-KMS or SSE-C the ETag is not the MD5 of the content.
            checksums["md5"] = ""
        return Download(data=data, checksums=checksums)

    def get(self, key: str) -> bytes:
        full = self.prefix + key
        try:
            return _read_small(self.client.get_object(Bucket=self.bucket, Key=full),
                               f"s3://{self.bucket}/{full}")
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise SourceError("the object does not exist", where=f"s3://{self.bucket}/{full}",
                                  hint="Check the URL") from err
            raise self._classify(err, "read", full) from err
        except _CONNECTION_FAULTS + _TRUNCATED as err:
            raise TransientError(f"s3://{self.bucket}/{full}: {err}") from err
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.SSLError) as err:
            raise _permanent(err, f"s3://{self.bucket}/{full}") from err

    def _classify(self, err: botocore.exceptions.ClientError, action: str,
                  key: str = "") -> Exception:
        error = err.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        where = f"s3://{self.bucket}/{key}" if key else self.url
        if code == "NoSuchBucket" or (action == "list" and status == 404):
            return SourceError(f"the bucket {self.bucket!r} does not exist", where=where,
                               hint="Check stack.source (and stack.endpoint_url and "
                                    "stack.region for S3-compatible stores)")
        if code in _DENIED or status == 403:
            return SourceError(f"access denied to the stack ({code or status})", where=where,
                               hint="Check that this instance's role or keys may "
                                    "s3:ListBucket and s3:GetObject on it")
        if code in _CHANGED or status in (404, 412):
            return TransientError(f"{where} changed while it was being fetched")
        if status >= 500 or status == 429 or code in ("SlowDown", "RequestTimeout", "Throttling"):
            return TransientError(f"{where}: {code or status} {error.get('Message', '')}")
        return SourceError(f"the object store refused to {action} the stack: {code} "
                           f"{error.get('Message', '')}".rstrip(), where=where)


class S3Leases:
    """Lease objects under a prefix, written with S3's conditional writes."""

    def __init__(self, url: str, client: Any) -> None:
        self.url = url
        self.bucket, self.prefix = split_bucket_url(url)
        self.client = client

    def get(self, key: str) -> Optional[Tuple[bytes, str]]:
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            return _read_small(got, f"s3://{self.bucket}/{self.prefix}{key}"), got["ETag"]
        except botocore.exceptions.ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def create(self, key: str, data: bytes) -> bool:
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, token: str) -> bool:
        return self._put(key, data, IfMatch=token)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)

    def _put(self, key: str, data: bytes, **condition: str) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data,
                                   **condition)
            return True
        except botocore.exceptions.ClientError as err:
            # ConditionalRequestConflict: a concurrent conditional write to the same key.
            if err.response.get("Error", {}).get("Code") in _LOST_RACE:
                return False
            raise


# What the registry in stores/__init__.py looks up.
Source, Leases = S3Source, S3Leases


def _read_body(response: Dict[str, Any], size: int, where: str) -> bytes:
    """The body of a GetObject, refused (CorruptDownload) once more than `size` bytes arrive;
    never more than `size` + 1 bytes are read. The connection is closed, not drained, when the
    store sends more."""
    body = response["Body"]
    try:
        length = response.get("ContentLength")
        if length is None:  # chunked: read until the end or one byte past the listed size
            return check_not_longer(read_at_most(body.read, size), size, where)
        if int(length) > size:
            raise CorruptDownload(f"{where}: the store sent {length} bytes, it listed {size}")
        # http.client never hands out more than Content-Length bytes (and urllib3 refuses a
        # body cut shorter), so one read is the whole body: the hot path of a fetch.
        return body.read(size + 1)
    finally:
        body.close()


def _read_small(response: Dict[str, Any], where: str) -> bytes:
    """The body of an object read by key (the lock, a lease), at most SMALL_OBJECT bytes."""
    try:
        return _read_body(response, SMALL_OBJECT, where)
    except CorruptDownload as err:
        raise SourceError(f"the object is larger than {SMALL_OBJECT} bytes, far more than an "
                          "image lock or a lease record holds", where=where,
                          hint="Check the URL names the right object (and that the store "
                               "behind stack.endpoint_url is the one you meant)") from err


def _permanent(err: Exception, where: str) -> SourceError:
    if isinstance(err, botocore.exceptions.SSLError):
        return SourceError(f"the store's TLS certificate was not accepted: {err}", where=where,
                           hint="For a private CA set stack.ca_bundle to its PEM file")
    return SourceError("no AWS credentials found to read the stack", where=where,
                       hint="Attach an instance profile that may read the bucket, or set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(/etc/quay-bootstrap/environment under systemd)")
