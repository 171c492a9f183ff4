"""A local stand-in for data.commoncrawl.org: serves a Common-Crawl-layout folder on 127.0.0.1 with injected faults.

    with CCServer(folder, fault_rate=0.25, seed=1) as server:
        download.Config(source=server.url, ...)
        server.log  # [(path, range header, fault), ...] one per request

Every GET draws from one seeded RNG: with probability `fault_rate` the response gets one of `faults` (below).
`force(path, fault, ...)` queues faults for the next requests of one path, for tests that need a given failure.
Range requests (bytes=a-b, bytes=a-, bytes=-n) are answered 206 with Content-Range, or 416; `ignore_range=True`
answers 200 with the whole file instead, as some servers do. HTTP/1.1 keep-alive, like the real service.
"""

from __future__ import annotations

import http.server
import random
import re
import socket
import struct
import threading
import time
from collections import defaultdict
from pathlib import Path

FAULTS = (
    "503",  # 503 SlowDown with S3's XML error body
    "429",  # too many requests
    "xml200",  # status 200 with an XML error body and a binary Content-Type, as a misbehaving proxy sends
    "drop",  # the connection is reset (RST) part-way through the body
    "truncate",  # Content-Length promises the whole body, fewer bytes are sent, the connection closes
    "wrong_length",  # Content-Length 1-7 bytes short of the body (inside the last gzip member's 8-byte trailer)
    "slow",  # a correct response after small sleeps (up to 0.1 s before it and between chunks)
)
SLOW_MAX_S = 0.1  # small enough that a test with dozens of requests stays fast
SEND_CHUNK = 64 * 1024

SLOWDOWN_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"""
DENIED_XML = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"""


class CCServer:
    def __init__(self, root: Path, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS, seed: int = 0,
                 ignore_range: bool = False):
        unknown = set(faults) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {unknown}; choose from {FAULTS}")
        self.root, self.fault_rate, self.faults = Path(root).resolve(), fault_rate, tuple(faults)
        self.ignore_range = ignore_range
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.forced: dict[str, list[str]] = defaultdict(list)
        self.log: list[tuple[str, str | None, str | None]] = []  # (path, Range header, fault or None)
        handler = type("Handler", (_Handler,), {"server_state": self})
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> CCServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def force(self, path: str, *faults: str) -> None:
        self.forced[path].extend(faults)

    def requests_for(self, path: str) -> list[tuple[str, str | None, str | None]]:
        return [entry for entry in self.log if entry[0] == path]

    def draw(self, path: str, range_header: str | None) -> tuple[str | None, random.Random]:
        """The fault for this request, and a private RNG for its details (where to cut, how long to sleep)."""
        with self.lock:
            if self.forced.get(path):
                fault = self.forced[path].pop(0)
            elif self.rng.random() < self.fault_rate:
                fault = self.rng.choice(self.faults)
            else:
                fault = None
            self.log.append((path, range_header, fault))
            return fault, random.Random(self.rng.random())


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a fault must also close the connection it spoils
    server_state: CCServer

    def log_message(self, *args) -> None:  # quiet: the test output is for the tests
        pass

    def do_GET(self) -> None:
        state = self.server_state
        path = self.path.split("?")[0].lstrip("/")
        range_header = self.headers.get("Range")
        fault, rng = state.draw(path, range_header)
        file = (state.root / path).resolve()
        if state.root not in file.parents or not file.is_file():
            return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
        if fault == "slow":
            time.sleep(rng.uniform(0, SLOW_MAX_S))
        if fault == "503":
            return self._send(503, SLOWDOWN_XML, "application/xml")
        if fault == "429":
            return self._send(429, b"Too Many Requests", "text/plain")
        if fault == "xml200":
            return self._send(200, DENIED_XML, "application/octet-stream")

        data = file.read_bytes()
        status, headers = 200, {}
        if range_header and not state.ignore_range:
            span = _parse_range(range_header, len(data))
            if span is None:
                return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
            a, b = span  # inclusive
            status, headers = 206, {"Content-Range": f"bytes {a}-{b}/{len(data)}"}
            data = data[a: b + 1]

        length = len(data)
        if fault == "wrong_length":
            length = max(0, len(data) - rng.randint(1, 7))
        sent = len(data)
        if fault in ("drop", "truncate"):
            sent = rng.randrange(0, max(len(data), 1))
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in headers.items():
            self.send_header(k, v)
        if fault in ("drop", "truncate", "wrong_length"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        try:
            for i in range(0, sent, SEND_CHUNK):
                self.wfile.write(data[i: min(i + SEND_CHUNK, sent)])
                if fault == "slow":
                    time.sleep(rng.uniform(0, SLOW_MAX_S / 10))
            self.wfile.flush()
            if fault == "drop":  # linger 0: close() sends RST, the client sees "connection reset"
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (BrokenPipeError, ConnectionResetError):  # the client hung up first (a sample read, a timeout)
            self.close_connection = True

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, of one `bytes=` range; None when it cannot be satisfied (HTTP 416)."""
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or not (m[1] or m[2]):
        return None
    if not m[1]:  # bytes=-n: the last n bytes
        return (max(size - int(m[2]), 0), size - 1) if size and int(m[2]) else None
    a, b = int(m[1]), int(m[2]) if m[2] else size - 1
    if a >= size or b < a:
        return None
    return a, min(b, size - 1)
