"""An object store on 127.0.0.1 that lies about sizes: S3 (path-style ListObjectsV2 and GetObject)
and the GCS JSON API (objects.list and media downloads), over real HTTP.

It lists every object with the size (and MD5) of the bytes put there, and serves those bytes,
except for keys told to lie: "longer" sends a Content-Length of `extra` bytes and streams them,
"longer-chunked" streams them with chunked transfer-encoding (no length to check up front),
"shorter" sends only `short` bytes with an honest Content-Length. The long bodies come from a
generator, never materialised; `sent` counts what each key's bodies actually got onto the socket
before the client hung up. With `endless` set, every listing page holds 1,000 more made-up keys
and promises another page, forever; `pages` counts the pages asked for.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

LIES = ("longer", "longer-chunked", "shorter")
_PIECE = b"\0" * (64 * 1024)


class LyingStore:
    """Start with `with LyingStore("bucket") as store:`; `store.url` is its endpoint (S3
    endpoint_url, or STORAGE_EMULATOR_HOST for GCS)."""

    def __init__(self, bucket: str, extra: int = 200 << 20, short: int = 100) -> None:
        self.bucket, self.extra, self.short = bucket, extra, short
        self.objects: Dict[str, Tuple[bytes, int]] = {}  # key -> (bytes, generation)
        self.lies: Dict[str, str] = {}
        self.sent: Dict[str, int] = {}
        self.gets: List[str] = []
        self.endless = False
        self.pages = 0
        self._generation = 0
        self._lock = threading.Lock()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                try:
                    store._answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client hung up: what it should do

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # --- what a test does --------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self._generation += 1
            self.objects[key] = (data, self._generation)

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)

    def lie(self, key: str, how: Optional[str]) -> None:
        """Make KEY's downloads lie (one of LIES), or tell the truth again (None)."""
        assert how is None or how in LIES, how
        with self._lock:
            if how is None:
                self.lies.pop(key, None)
            else:
                self.lies[key] = how

    def __enter__(self) -> "LyingStore":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- the protocols -----------------------------------------------------------------------

    def _answer(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = unquote(url.path)
        gcs_list = f"/storage/v1/b/{self.bucket}/o"
        if path == gcs_list:
            return self._gcs_list(handler, query.get("prefix", ""), query.get("pageToken", ""))
        for media in (f"/download/storage/v1/b/{self.bucket}/o/", gcs_list + "/"):
            if path.startswith(media) and query.get("alt") == "media":
                return self._object(handler, path[len(media):], gcs=True)
        if path.rstrip("/") == f"/{self.bucket}" and query.get("list-type") == "2":
            return self._s3_list(handler, query.get("prefix", ""),
                                 query.get("continuation-token", ""))
        if path.startswith(f"/{self.bucket}/"):
            return self._object(handler, path[len(self.bucket) + 2:], gcs=False)
        self._reply(handler, 404, b"no such thing", "text/plain")

    def _listing(self, prefix: str, page: str = "") -> List[Tuple[str, bytes, int]]:
        with self._lock:
            self.pages += 1
            if self.endless:
                start = int(page or 0) * 1000
                return [(f"{prefix}extra_ca_certs/more-{i:09d}.crt", b"x", 1)
                        for i in range(start, start + 1000)]
            return sorted((k, d, g) for k, (d, g) in self.objects.items() if k.startswith(prefix))

    def _next(self, page: str) -> str:
        return str(int(page or 0) + 1) if self.endless else ""

    def _s3_list(self, handler, prefix: str, page: str) -> None:
        after = self._next(page)
        more = (f"<IsTruncated>true</IsTruncated><NextContinuationToken>{after}"
                "</NextContinuationToken>") if after else "<IsTruncated>false</IsTruncated>"
        rows = "".join(
            f"<Contents><Key>{escape(key)}</Key><LastModified>2026-01-01T00:00:00.000Z"
            f"</LastModified><ETag>&quot;{hashlib.md5(data).hexdigest()}&quot;</ETag>"
            f"<Size>{len(data)}</Size><StorageClass>STANDARD</StorageClass></Contents>"
            for key, data, _ in self._listing(prefix, page))
        body = ('<?xml version="1.0" encoding="UTF-8"?>'
                '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"<Name>{self.bucket}</Name><Prefix>{escape(prefix)}</Prefix>"
                f"<KeyCount>{rows.count('<Contents>')}</KeyCount><MaxKeys>1000</MaxKeys>"
                f"{more}{rows}</ListBucketResult>").encode()
        self._reply(handler, 200, body, "application/xml")

    def _gcs_list(self, handler, prefix: str, page: str) -> None:
        items = [{"kind": "storage#object", "bucket": self.bucket, "name": key,
                  "size": str(len(data)), "generation": str(generation), "metageneration": "1",
                  "md5Hash": base64.b64encode(hashlib.md5(data).digest()).decode()}
                 for key, data, generation in self._listing(prefix, page)]
        answer = {"kind": "storage#objects", "items": items}
        if self._next(page):
            answer["nextPageToken"] = self._next(page)
        self._reply(handler, 200, json.dumps(answer).encode(), "application/json")

    def _object(self, handler, key: str, gcs: bool) -> None:
        with self._lock:
            found = self.objects.get(key)
            how = self.lies.get(key)
            self.gets.append(key)
        if found is None:
            if gcs:
                return self._reply(handler, 404, b'{"error": {"code": 404}}', "application/json")
            return self._reply(handler, 404, b"<Error><Code>NoSuchKey</Code></Error>",
                               "application/xml")
        data, generation = found
        headers = {"ETag": f'"{hashlib.md5(data).hexdigest()}"',
                   "x-goog-generation": str(generation)}
        kind = "application/octet-stream"
        if how is None:
            return self._reply(handler, 200, data, kind, headers)
        if how == "shorter":
            return self._reply(handler, 200, data[:self.short], kind, headers)
        handler.send_response(200)
        for name, value in {**headers, "Content-Type": kind}.items():
            handler.send_header(name, value)
        chunked = how == "longer-chunked"
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(self.extra))
        handler.end_headers()
        for piece in self._long_body():
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            with self._lock:
                self.sent[key] = self.sent.get(key, 0) + len(piece)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")

    def _long_body(self) -> Iterator[bytes]:
        left = self.extra
        while left > 0:
            piece = _PIECE[:min(left, len(_PIECE))]
            left -= len(piece)
            yield piece

    @staticmethod
    def _reply(handler, status: int, body: bytes, content_type: str,
               headers: Optional[Dict[str, str]] = None) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
