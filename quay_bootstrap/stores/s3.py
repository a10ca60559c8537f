"""conf/stack from S3 and S3-compatible stores (Ceph RGW, MinIO, Swift's S3 API), via boto3."""
from __future__ import annotations

import base64
import re
from typing import Any, Dict, List, Optional

import boto3
import botocore.config
import botocore.exceptions

from quay_bootstrap.errors import CorruptDownload, SourceError, TransientError
from quay_bootstrap.stores import Download, ObjectInfo, split_bucket_url

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


class S3Source:
    """A prefix in an S3 bucket; credentials from boto3's default chain (env, instance profile)."""

    def __init__(self, url: str, *, endpoint_url: Optional[str] = None,
                 region: Optional[str] = None, ca_bundle: Optional[str] = None,
                 concurrency: int = 16) -> None:
        self.url = url
        self.bucket, self.prefix = split_bucket_url(url)
        options: Dict[str, Any] = dict(
            max_pool_connections=concurrency,
            connect_timeout=5,
            read_timeout=30,
            # The fetch retries with its own deadline; botocore's retries would multiply it.
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
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, verify=ca_bundle,
            config=config)

    def list(self) -> List[ObjectInfo]:
        objects = []
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
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
        except botocore.exceptions.ClientError as err:
            raise self._classify(err, "list") from err
        except _CONNECTION_FAULTS as err:
            raise TransientError(f"{self.url}: {err}") from err
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.SSLError) as err:
            raise _permanent(err, self.url) from err
        return objects

    def read(self, obj: ObjectInfo) -> Download:
        key = self.prefix + obj.key
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key,
                                               IfMatch=f'"{obj.token}"', ChecksumMode="ENABLED")
            data = response["Body"].read()
        except botocore.exceptions.ClientError as err:
            raise self._classify(err, "read", key) from err
        except _CONNECTION_FAULTS as err:
            raise TransientError(f"s3://{self.bucket}/{key}: {err}") from err
        except botocore.exceptions.FlexibleChecksumError as err:
            raise CorruptDownload(str(err)) from err
        except _TRUNCATED as err:
            raise CorruptDownload(f"truncated download: {err}") from err
        except (botocore.exceptions.NoCredentialsError, botocore.exceptions.SSLError) as err:
            raise _permanent(err, f"s3://{self.bucket}/{key}") from err
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
            return self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
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


def _permanent(err: Exception, where: str) -> SourceError:
    if isinstance(err, botocore.exceptions.SSLError):
        return SourceError(f"the store's TLS certificate was not accepted: {err}", where=where,
                           hint="For a private CA set stack.ca_bundle to its PEM file")
    return SourceError("no AWS credentials found to read the stack", where=where,
                       hint="Attach an instance profile that may read the bucket, or set "
                            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(/etc/quay-bootstrap/environment under systemd)")
