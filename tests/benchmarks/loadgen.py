"""A closed-loop HTTP/1.1 load generator on raw sockets: cheap enough not to be the bottleneck.

    result = run_load("127.0.0.1", 8400, make_request, concurrency=16, seconds=5.0)

`concurrency` keep-alive connections each send a request, read the whole answer (Content-Length
or chunked), record its latency and time to first body byte, and send the next, for `seconds`.
One selector loop in one thread: about 30 µs of CPU per request here (httpx costs ~400 µs),
so pinned to the other core it measures the server, not itself. `make_request(i)` returns the
request's bytes (build them once or per request: a unique prompt per request is a counter).
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["LoadResult", "http_request", "run_load"]


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None, host: str = "bench") -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {host}", "content-type: application/json",
             f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class LoadResult:
    latencies_ms: list[float] = field(default_factory=list)  # request sent -> last byte of the answer
    first_byte_ms: list[float] = field(default_factory=list)  # request sent -> first byte of the body
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0  # measured window
    client_cpu_s: float = 0.0  # this thread's CPU time in the window

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.sent_at = 0.0
        self.first_at = 0.0
        self.out = b""
        self.reset()

    def reset(self) -> None:
        self.head_done = False
        self.status = 0
        self.length: int | None = None  # Content-Length, or None for chunked
        self.body_start = 0
        self.chunk_pos = 0  # chunked: where the next chunk-size line starts

    def parse(self, now: float) -> bool:
        """Whether the buffer holds a complete answer (then it is consumed)."""
        buf = self.buf
        if not self.head_done:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            head = bytes(buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(head[0].split(" ", 2)[1])
            self.length = None
            chunked = False
            for line in head[1:]:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name == "content-length":
                    self.length = int(value)
                elif name == "transfer-encoding" and "chunked" in value.lower():
                    chunked = True
            if not chunked and self.length is None:
                self.length = 0
            self.head_done = True
            self.body_start = self.chunk_pos = end + 4
        if len(buf) > self.body_start and not self.first_at:
            self.first_at = now
        if self.length is not None:
            done_at = self.body_start + self.length
            if len(buf) < done_at:
                return False
            del buf[:done_at]
            return True
        while True:  # chunked
            line_end = buf.find(b"\r\n", self.chunk_pos)
            if line_end < 0:
                return False
            size = int(bytes(buf[self.chunk_pos:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(buf) < line_end + 4:  # no trailers: "0\r\n\r\n"
                    return False
                del buf[:line_end + 4]
                return True
            if len(buf) < line_end + 2 + size + 2:
                return False
            self.chunk_pos = line_end + 2 + size + 2


def run_load(host: str, port: int, make_request: Callable[[int], bytes], *, concurrency: int, seconds: float,
             warmup: float = 1.0, on_window: Callable[[str], None] | None = None) -> LoadResult:
    """`concurrency` connections in a closed loop for `warmup` + `seconds`; answers in the window
    count. `on_window("start")` and `on_window("end")` run at the window's edges (e.g. to read a
    server's CPU time)."""
    selector = selectors.DefaultSelector()
    conns = []
    counter = 0
    for _ in range(concurrency):
        sock = socket.create_connection((host, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        conn = _Conn(sock)
        conns.append(conn)
        selector.register(sock, selectors.EVENT_READ, conn)
    result = LoadResult()
    started = time.perf_counter()
    window_start = started + warmup
    window_end = window_start + seconds
    cpu_start: float | None = None

    def send(conn: _Conn) -> None:
        nonlocal counter
        counter += 1
        conn.reset()
        conn.first_at = 0.0
        conn.sent_at = time.perf_counter()
        data = make_request(counter)
        sent = conn.sock.send(data)
        if sent < len(data):  # rare for small requests: finish blocking
            conn.sock.setblocking(True)
            conn.sock.sendall(data[sent:])
            conn.sock.setblocking(False)

    for conn in conns:
        send(conn)
    try:
        while True:
            now = time.perf_counter()
            if cpu_start is None and now >= window_start:
                cpu_start = time.thread_time()
                if on_window is not None:
                    on_window("start")
            if now >= window_end:
                if on_window is not None:
                    on_window("end")
                break
            for key, _ in selector.select(timeout=0.5):
                conn = key.data
                data = conn.sock.recv(262144)
                if not data:
                    raise RuntimeError("the server closed a connection")
                conn.buf += data
                now = time.perf_counter()
                if conn.parse(now):
                    if window_start <= conn.sent_at and now <= window_end:
                        result.latencies_ms.append((now - conn.sent_at) * 1000.0)
                        result.first_byte_ms.append(((conn.first_at or now) - conn.sent_at) * 1000.0)
                        result.statuses[conn.status] = result.statuses.get(conn.status, 0) + 1
                    if now < window_end:
                        send(conn)
    finally:
        result.client_cpu_s = time.thread_time() - (cpu_start or time.thread_time())
        for conn in conns:
            selector.unregister(conn.sock)
            conn.sock.close()
        selector.close()
    result.seconds = seconds
    return result
