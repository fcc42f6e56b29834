"""An S3-compatible server for the object-store tests: moto in server mode, a real subprocess,
with a recording proxy in front of it that counts each request and can fail, corrupt, delay or
stall chosen ones (what a flaky network or a dying download looks like to s3fs)."""

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from tests.factories import free_port

# moto accepts any credentials; set so that no developer's own AWS settings are used.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_moto(log_file: Path, timeout: float = 30) -> tuple[subprocess.Popen, str]:
    """`python -m moto.server` on a free port, once it answers."""
    port = free_port()
    log = open(log_file, "ab")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1)
            return process, endpoint
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start; see {log_file}") from None
            time.sleep(0.2)


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def upload_folder(endpoint: str, bucket: str, prefix: str, folder: Path) -> list[str]:
    """Every file of `folder` under `prefix/` (the bucket made if missing); their keys."""
    client = s3_client(endpoint)
    if bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    return keys


@dataclass
class Fault:
    """What the proxy does to the next `times` requests of `method` on a key ending in `key`
    (or on listings, for key "list"): "fail" answers 503, "corrupt" flips a byte of the body,
    "delay" waits `seconds` first, "stall" sends half the body and then nothing until the proxy
    closes."""

    method: str
    key: str
    action: str
    times: int = 1
    seconds: float = 0.0


@dataclass
class RecordingProxy:
    upstream: str
    requests: list[tuple[str, str]] = field(default_factory=list)  # method, path with query
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self.closed = threading.Event()
        self.stalled = threading.Event()  # set once a stalled body has been half sent
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def gets(self, key: str) -> int:
        """How many times an object whose key ends in `key` was downloaded (GET, no listing)."""
        with self._lock:
            return sum(
                1 for method, path in self.requests if method == "GET" and _targets(key, path)
            )

    def close(self) -> None:
        self.closed.set()
        self._server.shutdown()
        self._server.server_close()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests.append((method, path))
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and _targets(fault.key, path):
                    fault.times -= 1
                    return fault
        return None


def _targets(key: str, path: str) -> bool:
    target, _, query = path.partition("?")
    if key == "list":
        return "list-type=" in query
    return not query and target.endswith("/" + key)


def _handler(proxy: RecordingProxy) -> type[BaseHTTPRequestHandler]:
    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args) -> None:  # noqa: A002
            pass

        def do_GET(self) -> None:
            self._relay()

        do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        def _relay(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy._fault_for(self.command, self.path)
            if fault is not None and fault.action == "fail":
                self._answer(503, [("Content-Type", "application/xml")], _UNAVAILABLE)
                return
            if fault is not None and fault.action == "delay":
                time.sleep(fault.seconds)
            upstream = urlsplit(proxy.upstream)
            connection = HTTPConnection(upstream.hostname, upstream.port, timeout=60)
            try:
                connection.request(self.command, self.path, body, dict(self.headers))
                response = connection.getresponse()
                data = response.read()
                headers = response.getheaders()
            finally:
                connection.close()
            if fault is not None and fault.action == "corrupt" and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            if fault is not None and fault.action == "stall":
                self._answer(response.status, headers, data, stall=True)
                return
            self._answer(response.status, headers, data)

        def _answer(self, status, headers, data: bytes, stall: bool = False) -> None:
            self.send_response(status)
            length = str(len(data))
            for name, value in headers:
                if name.lower() in ("transfer-encoding", "connection", "content-length"):
                    if self.command == "HEAD" and name.lower() == "content-length":
                        length = value
                    continue
                self.send_header(name, value)
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command == "HEAD":
                return
            if stall:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                proxy.stalled.set()
                proxy.closed.wait(120)
                self.close_connection = True
                return
            self.wfile.write(data)

    return Relay


_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>ServiceUnavailable</Code>'
    b"<Message>The server is unavailable.</Message></Error>"
)
