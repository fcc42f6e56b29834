"""A hand-written HTTP/1.1 client for load generators: it costs a small fraction of a full
client's CPU a request (httpx's is about 2 ms on this machine), so that the load it makes weighs
little beside the servers it measures."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Connection:
    """One keep-alive HTTP/1.1 connection, requests and answers handled by hand, so that the
    load generator costs little beside the servers it measures."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    host: str

    @classmethod
    async def open(cls, base: str) -> "Connection":
        url = urlsplit(base)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        return cls(reader, writer, url.netloc)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        status, length, chunked = await self._exchange(method, path, body)
        if not chunked:
            return status, await self.reader.readexactly(length)
        return status, b"".join([part async for part in self._chunks()])

    async def stream(
        self, method: str, path: str, body: bytes = b""
    ) -> tuple[int, AsyncIterator[bytes]]:
        """The status, then the body as it comes: a chunked answer (a Server-Sent Events
        stream) chunk by chunk, which the body must be read to the end of before the next
        request."""
        status, length, chunked = await self._exchange(method, path, body)
        return status, self._chunks() if chunked else self._whole(length)

    async def _exchange(self, method: str, path: str, body: bytes) -> tuple[int, int, bool]:
        """Send a request; its answer's status, Content-Length, and whether it is chunked."""
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length, chunked = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        return status, length, chunked

    async def _whole(self, length: int) -> AsyncIterator[bytes]:
        yield await self.reader.readexactly(length)

    async def _chunks(self) -> AsyncIterator[bytes]:
        while size := int((await self.reader.readline()).split(b";")[0], 16):
            yield await self.reader.readexactly(size)
            await self.reader.readline()
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass  # trailers

    def close(self) -> None:
        self.writer.close()


async def read_completion(connection: Connection, body: bytes) -> tuple[float | None, int]:
    """A streamed /v1/completions request: seconds to its first text, and its completion tokens
    (the usage chunk's). Only chunks that may hold them are decoded: until the first text, and
    the usage chunk."""
    started = time.perf_counter()
    first, tokens = None, 0
    status, chunks = await connection.stream("POST", "/v1/completions", body)
    async for chunk in chunks:
        if status != 200:
            raise RuntimeError(f"answered {status}: {chunk[:400]!r}")
        for line in chunk.splitlines():
            if not line.startswith(b"data: {"):
                continue
            if first is None:
                choices = json.loads(line[6:]).get("choices") or []
                if any(choice.get("text") for choice in choices):
                    first = time.perf_counter() - started
            if b'"completion_tokens"' in line:
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return first, tokens
