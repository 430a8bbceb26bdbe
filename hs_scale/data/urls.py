"""Corpus locations as URLs: local paths, ``file://``, ``pipe:<command>``, ``http(s)://`` and ``s3://``.

A corpus is a location holding ``manifest.parquet``, ``tokenizer.model``, ``cmvn.json`` and the shards, all named
by paths relative to it. `join(corpus, rel)` builds a member's URL:

- local / file:// / http(s):// / s3://   ``<corpus>/<rel>``
- pipe:                                    the command with ``{}`` replaced by ``rel``, e.g.
  ``pipe:aws s3 cp s3://bucket/corpus/{} -`` or ``pipe:curl -sf http://host/corpus/{}`` (webdataset's idiom)

Openers (all return a binary file object that is read sequentially, never seeked):
- local and pipe: ``webdataset.gopen`` (the same opener webdataset itself uses);
- http(s): ``requests`` with ``stream=True`` and connect/read timeouts, so a stalled server raises instead of
  hanging; urllib3 enforces Content-Length, so a truncated body raises too;
- s3: ``boto3`` ``get_object`` (endpoint from ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3``, credentials from
  the usual boto3 chain). boto3 rather than fsspec/s3fs: s3fs pins aiobotocore, which pins botocore to a narrow
  range and fights boto3 in the same environment; a sequential GET is all the loader needs.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading

_REMOTE = re.compile(r"^(https?|s3)://")


def is_remote(url: str) -> bool:
    """True for http(s):// and s3:// (the schemes that are checked with a request, not the file system)."""
    return bool(_REMOTE.match(url))


def is_url(url: str) -> bool:
    return is_remote(url) or url.startswith(("pipe:", "file://"))


def local_path(url: str) -> str | None:
    """The file system path of a local location, or None for pipe:/http/s3."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if is_url(url) else url


def join(base: str, rel: str) -> str:
    """URL of `rel` (a relative path) inside the location `base`."""
    if base.startswith("pipe:"):
        if "{}" not in base:
            raise ValueError(f"pipe: corpus location {base!r} needs a '{{}}' where the relative path goes, e.g. "
                             "'pipe:curl -sf http://host/corpus/{}'")
        return base.replace("{}", rel)
    if local_path(base) is not None and not base.startswith("file://"):
        return os.path.join(base, rel)
    return base.rstrip("/") + "/" + rel


def parent(url: str) -> str:
    """The location holding `url` (for a manifest given as a file)."""
    if url.startswith("pipe:"):
        raise ValueError(f"give a pipe: corpus as the location with '{{}}' (not the manifest's command): {url!r}")
    if local_path(url) is not None and not url.startswith("file://"):
        return os.path.dirname(os.path.abspath(url))
    return url.rsplit("/", 1)[0]


_S3_CLIENTS: dict[tuple, object] = {}
_S3_LOCK = threading.Lock()


def _s3_client():
    """One boto3 S3 client per process and endpoint: creating one costs ~50 ms, and clients (unlike the default
    session that creates them) are thread-safe but not fork-safe, hence keyed by pid."""
    import boto3

    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    with _S3_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            # NOTE: AWS_ENDPOINT_URL(_S3) is honoured by boto3 itself (>= 1.28); nothing to pass here.
            client = _S3_CLIENTS[key] = boto3.session.Session().client("s3")
        return client


def open_url(url: str, timeout: float = 30.0):
    """A readable binary stream for `url`. Raises FileNotFoundError for a missing object, OSError otherwise."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    if url.startswith(("http://", "https://")):
        import requests

        resp = requests.get(url, stream=True, timeout=(min(timeout, 10.0), timeout))
        if resp.status_code == 404:
            resp.close()
            raise FileNotFoundError(f"{url}: HTTP 404 not found")
        if resp.status_code != 200:
            resp.close()
            raise OSError(f"{url}: HTTP {resp.status_code}")
        resp.raw.decode_content = True
        return _buffered(resp.raw)
    if url.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, _, key = url[len("s3://"):].partition("/")
        try:
            return _buffered(_s3_client().get_object(Bucket=bucket, Key=key)["Body"])
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NoSuchBucket"):
                raise FileNotFoundError(f"{url}: {code}") from None
            raise OSError(f"{url}: {exc}") from None
    return open(local_path(url), "rb")


class _Raw(io.RawIOBase):
    """A file-like with read(n) (urllib3 / botocore response bodies) as a RawIOBase, so that io.BufferedReader can
    serve the tar reader's many small reads (512-byte headers) from a 1 MiB buffer instead of one network-library
    call each."""

    def __init__(self, body):
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        # NOTE: at most 32 KiB per call: a read that fails loses what it had received, so small reads keep the
        # samples that arrived before a dropped connection (the retry then skips them instead of re-reading).
        data = self.body.read(min(len(b), 1 << 15))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


def _buffered(body) -> io.BufferedReader:
    return io.BufferedReader(_Raw(body), 1 << 20)


def read_bytes(url: str, timeout: float = 30.0) -> bytes:
    with open_url(url, timeout) as fh:
        data = fh.read()
    if url.startswith("pipe:"):
        if not data:
            raise FileNotFoundError(f"{url}: the command wrote nothing")
    return data


def exists(url: str, timeout: float = 30.0) -> bool:
    """Does `url` exist? (HEAD for http, head_object for s3; pipe: locations are assumed to exist.)"""
    path = local_path(url)
    if path is not None:
        return os.path.exists(path)
    if url.startswith("pipe:"):
        return True
    if url.startswith("s3://"):
        from botocore.exceptions import ClientError

        bucket, _, key = url[len("s3://"):].partition("/")
        try:
            _s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except ClientError:
            return False
    import requests

    return requests.head(url, timeout=timeout, allow_redirects=True).status_code == 200


def local_copy(url: str, cache_dir: str | None = None) -> str:
    """A local file path with `url`'s content (the url itself when local). Remote files are downloaded into
    `cache_dir` (default: a per-user temp dir) under a name keyed by their content, so a changed file at the same
    URL is never served stale."""
    path = local_path(url)
    if path is not None:
        return path
    import hashlib

    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), f"hs_scale-url-cache-{os.getuid()}")
    os.makedirs(cache_dir, exist_ok=True)
    data = read_bytes(url)
    name = hashlib.sha1(data).hexdigest()[:20] + "-" + os.path.basename(url.rstrip("/ -"))
    dst = os.path.join(cache_dir, re.sub(r"[^A-Za-z0-9._-]", "_", name))
    if not os.path.exists(dst):
        tmp = f"{dst}.tmp-{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dst)
    return dst

