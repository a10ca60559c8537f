"""Unconditional writes of small objects under a lease store's prefix (a published bundle, a
node's status record), with the store's own client: S3 put_object, GCS upload, or a file
renamed into place (file:// is for debugging)."""
from __future__ import annotations

import os
from typing import Callable

from quay_bootstrap.errors import ConfigError, SourceError


def uploader(leases) -> Callable[[str, bytes], None]:
    """upload(key, data) under LEASES' prefix; a refusal is a SourceError saying what to grant."""
    from quay_bootstrap.stack.published import client_of

    url: str = leases.url
    scheme = url.partition("://")[0]
    if scheme == "file":
        from quay_bootstrap.paths import make_dirs
        from quay_bootstrap.stores.file import directory

        root = directory(url)

        def put_file(key: str, data: bytes) -> None:
            target = root / key
            make_dirs(target.parent, mode=0o755)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return _denied_is_clear(put_file, url)
    if scheme == "s3":
        from quay_bootstrap.stores import split_bucket_url

        bucket, prefix = split_bucket_url(url)

        def put_s3(key: str, data: bytes) -> None:
            client_of(leases).put_object(Bucket=bucket, Key=prefix + key, Body=data)
        return _denied_is_clear(put_s3, url)
    if scheme == "gs":
        from quay_bootstrap.stores import split_bucket_url

        bucket, prefix = split_bucket_url(url)

        def put_gcs(key: str, data: bytes) -> None:
            client_of(leases).bucket(bucket).blob(prefix + key).upload_from_string(data)
        return _denied_is_clear(put_gcs, url)
    raise ConfigError(f"publishing to {scheme}:// is not supported", where=url)


def _denied_is_clear(put: Callable[[str, bytes], None], url: str) -> Callable[[str, bytes], None]:
    def upload(key: str, data: bytes) -> None:
        try:
            put(key, data)
        except PermissionError as err:
            raise _denied(url, key) from err
        except Exception as err:  # noqa: BLE001 - the SDKs' errors, sorted by what they say
            text = f"{type(err).__name__} {err}"
            if any(word in text for word in ("AccessDenied", "403", "Forbidden")):
                raise _denied(url, key) from err
            if any(word in text for word in ("NoSuchBucket", "NotFound", "404")):
                bucket = url.partition("://")[2].split("/")[0]
                raise SourceError(f"the bucket {bucket!r} does not exist; nothing nodes see "
                                  "changed", where=f"{url}/{key}",
                                  hint="Check the URL (--to, or stack.source in the config); "
                                       "create the bucket first if it is new") from err
            raise SourceError(f"writing {key} failed: {err}", where=f"{url}/{key}",
                              hint="Try again; check the store's answer") from err
    return upload


def _denied(url: str, key: str) -> SourceError:
    return SourceError(f"no permission to write under {url}; nothing nodes see changed",
                       where=f"{url}/{key}",
                       hint=f"Grant the publisher write access to {url}/ (S3: s3:PutObject; GCS: "
                            "storage.objects.create and .delete), or publish with credentials "
                            "that have it")
