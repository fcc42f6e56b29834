"""Fault injection: a TCP relay in front of Postgres or Redis that a test can cut and restore
(what a server restart or a network partition looks like to the clients behind it), and the
checks the fault tests share: which jobs run where, and that each succeeded exactly once."""

import socket
import threading
import time
from collections.abc import Callable

from sqlalchemy import func, select

from db.session import session_scope
from db.tables import Job, JobResult, Usage
from tests.factories import submit

MODEL = "tiny-faults"
QUEUE = "llmq.tiny-faults.cpu"
# Long enough that a batch is still decoding when the signal lands; never answered from the
# completion cache, as the tests repeat their prompts and need every job to run.
LONG_JOB = {"model": MODEL, "max_tokens": 400, "ignore_eos": True, "cache": False}


class CuttableLink:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._up = True
        self._closed = False
        threading.Thread(target=self._accept, name="link-accept", daemon=True).start()

    def url_for(self, url: str) -> str:
        """`url` with the upstream's port replaced by the link's."""
        return url.replace(f":{self.upstream[1]}/", f":{self.port}/")

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until restored."""
        with self._lock:
            self._up = False
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            shut(sock)

    def restore(self) -> None:
        with self._lock:
            self._up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                up = self._up
            if not up:
                shut(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                shut(client)
                continue
            with self._lock:
                self._sockets += [client, server]
            self._relay_pair(client, server)

    def _relay_pair(self, client: socket.socket, server: socket.socket) -> None:
        """Relay one connection both ways (a subclass may watch what passes)."""
        for source, sink in ((client, server), (server, client)):
            threading.Thread(target=pump, args=(source, sink), daemon=True).start()


class HttpFaultLink(CuttableLink):
    """A link in front of an HTTP server that can also answer each new request itself with
    an error status (`fail_with`), or take requests and never answer them (`hang`)."""

    def __init__(self, upstream_port: int, port: int = 0) -> None:
        super().__init__(upstream_port, port=port)
        self.fail_with: tuple[int, dict[str, str]] | None = None  # status, headers
        self.hang = False
        self.error_times: list[float] = []  # time.monotonic() of each error answered

    def _relay_pair(self, client: socket.socket, server: socket.socket) -> None:
        if self.hang:
            return  # both ends stay open and silent until cut
        if self.fail_with is not None:
            status, headers = self.fail_with
            threading.Thread(
                target=self._answer_error, args=(client, server, status, headers), daemon=True
            ).start()
            return
        super()._relay_pair(client, server)

    def _answer_error(self, client, server, status: int, headers: dict[str, str]) -> None:
        shut(server)
        try:
            client.recv(65536)  # the request: its content does not matter
            body = b'{"error": {"message": "injected fault", "type": "server_error"}}'
            lines = [f"HTTP/1.1 {status} Injected", f"Content-Length: {len(body)}"]
            lines += ["Content-Type: application/json", "Connection: close"]
            lines += [f"{name}: {value}" for name, value in headers.items()]
            client.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            self.error_times.append(time.monotonic())
        except OSError:
            pass
        finally:
            shut(client)


def pump(
    source: socket.socket,
    sink: socket.socket,
    passes: Callable[[bytes], bool] | None = None,
) -> None:
    """Copy one direction of a connection until it ends, or until `passes` (shown each chunk
    before it is sent on) says False: then the chunk is not sent and both ends are shut."""
    try:
        while data := source.recv(65536):
            if passes is not None and not passes(data):
                return
            sink.sendall(data)
    except OSError:
        pass
    finally:
        shut(source)
        shut(sink)


def shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def submit_jobs(client, count: int) -> list[str]:
    return [submit(client, prompt=f"story {i}", **LONG_JOB)["id"] for i in range(count)]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def statuses(database_url, job_ids) -> dict[str, str]:
    with session_scope(database_url) as session:
        rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids)))
        return {str(row.id): row.status for row in rows}


def running_on(database_url, job_ids, worker_pid: int) -> int:
    with session_scope(database_url) as session:
        return session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.id.in_(job_ids),
                Job.status == "running",
                Job.worker.like(f"%.{worker_pid}@%"),
            )
        )


def assert_each_succeeded_once(database_url, job_ids) -> list[Job]:
    wait_until(
        lambda: set(statuses(database_url, job_ids).values()) == {"succeeded"},
        timeout=120,
        what=f"all jobs to succeed (now {statuses(database_url, job_ids)})",
    )
    with session_scope(database_url) as session:
        for table in (JobResult, Usage):
            counts = dict(
                session.execute(
                    select(table.job_id, func.count())
                    .where(table.job_id.in_(job_ids))
                    .group_by(table.job_id)
                ).all()
            )
            assert len(counts) == len(job_ids) and set(counts.values()) == {1}, table
        return list(session.scalars(select(Job).where(Job.id.in_(job_ids))))
