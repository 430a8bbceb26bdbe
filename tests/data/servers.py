"""Real servers on loopback for the streaming tests: an HTTP file server that can inject faults, and moto_server
(an S3-protocol server) holding a corpus in a bucket. Both are started by the tests and stopped after them."""

from __future__ import annotations

import collections
import functools
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class FaultyHandler(SimpleHTTPRequestHandler):
    """Serves files from the server's directory. `server.faults[path]` is a list of faults, one used per GET of
    that path: "404" (not found), "drop" (close the connection half-way through the body), "truncate" (announce
    the full Content-Length but send a tenth of the body, then close)."""

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        path = self.path.lstrip("/").split("?")[0]
        self.server.requests[path] += 1
        faults = self.server.faults.get(path)
        fault = faults.pop(0) if faults else None
        if fault == "404":
            self.send_error(404)
            return
        if fault not in ("drop", "truncate"):
            return super().do_GET()
        with open(os.path.join(self.directory, path), "rb") as fh:
            data = fh.read()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // (2 if fault == "drop" else 10)])
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class HTTPFileServer:
    """`with HTTPFileServer(dir) as srv:` serves `dir` at `srv.url`; `srv.faults`, `srv.requests` as above."""

    def __init__(self, directory: str):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(FaultyHandler, directory=directory))
        self.httpd.daemon_threads = True
        self.httpd.faults = self.faults = {}
        self.httpd.requests = self.requests = collections.Counter()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto_server on loopback; `upload(dir, bucket, prefix)` copies a corpus into a bucket. Sets the AWS
    environment (endpoint, fake credentials) for this process and its children while running."""

    ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self._old = {k: os.environ.get(k) for k in [*self.ENV, "AWS_ENDPOINT_URL"]}
        os.environ.update(self.ENV, AWS_ENDPOINT_URL=self.endpoint)
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        return self

    def upload(self, directory: str, bucket: str, prefix: str) -> str:
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=bucket)
        for root, _, files in os.walk(directory):
            for f in files:
                path = os.path.join(root, f)
                s3.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, directory)}")
        return f"s3://{bucket}/{prefix}"

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for k, v in self._old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
