"""A stdlib HTTP server with a fixed thread pool and a deadline per connection (for the preference app).

    server = BoundedServer(("127.0.0.1", 0), Handler, workers=8, idle_timeout=30, max_connections=256)
    server.serve_forever()          # in one thread; server.shutdown() from another

http.server's ThreadingHTTPServer starts a thread per connection and lets it wait for a request forever:
N idle connections are N blocked threads. Here a connection costs a thread only once its whole request
has arrived, and a connection that does not send one in time is closed.
"""
from __future__ import annotations

import re
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import HTTPServer

MAX_HEAD = 16384  # request line + headers; a browser's are well under 2 KiB here


def request_state(buf: bytes, max_body: int) -> str:
    """Whether `buf` holds a whole request: "complete" once the head and its Content-Length body are in
    (or the body is over `max_body`, which the handler refuses from the head alone), "incomplete" before,
    "too large" for a head over MAX_HEAD bytes."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    if not ends:
        return "incomplete" if len(buf) <= MAX_HEAD else "too large"
    end = min(ends)
    m = re.search(rb"^content-length:[ \t]*(\d{1,12})[ \t]*\r?$", buf[:end], re.IGNORECASE | re.MULTILINE)
    length = int(m.group(1)) if m else 0
    return "complete" if length > max_body or len(buf) >= end + length else "incomplete"


class BoundedServer(HTTPServer):
    """An HTTP server with a fixed pool of `workers` threads and a deadline per connection.

    A new connection waits in a waiting room (one selector in the serving thread, no thread of its own)
    until its whole request (head and Content-Length body) has arrived; only then does a worker answer it,
    from memory. A connection that has not sent its whole request `idle_timeout` seconds after it was
    accepted is closed, and when `max_connections` are open the oldest waiting one is closed to admit the
    new one. So idle or trickling clients (slowloris) cost a file descriptor, never a thread, and cannot
    keep a real client out. HTTP/1.0 (BaseHTTPRequestHandler's default): one request per connection, hence
    no keep-alive to time out. The handler must read the request from `server.received.pop(self.request)`
    (see preference_app.make_handler's setup) and set its own `timeout` for writing the reply.
    """

    def __init__(self, address, handler, workers: int = 8, idle_timeout: float = 30.0, max_connections: int = 256,
                 max_body: int = 65536):
        self.idle_timeout, self.max_connections, self.max_body = idle_timeout, max_connections, max_body
        self.received: dict[socket.socket, bytes] = {}  # a dispatched request, for its handler's setup()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="preference-worker")
        self._waiting: dict[socket.socket, list] = {}  # conn -> [deadline, address, bytes so far], oldest first
        self._busy = 0
        self._lock = threading.Lock()
        self._stop, self._stopped = threading.Event(), threading.Event()
        self._stopped.set()
        super().__init__(address, handler)  # last: a failed bind calls server_close(), which needs the pool

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stop.clear()
        self._stopped.clear()
        sel = selectors.DefaultSelector()
        sel.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(poll_interval):
                    self._accept(sel) if key.fileobj is self.socket else self._receive(sel, key.fileobj)
                now = time.monotonic()
                for conn in [c for c, (deadline, *_) in self._waiting.items() if deadline <= now]:
                    self._drop(sel, conn)
        finally:
            for conn in list(self._waiting):
                self._drop(sel, conn)
            sel.close()
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def open_connections(self) -> tuple[int, int]:
        """(waiting, being answered or queued for a worker)."""
        with self._lock:
            return len(self._waiting), self._busy

    def _accept(self, sel) -> None:
        try:
            conn, address = self.socket.accept()
        except OSError:
            return
        waiting, busy = self.open_connections()
        if waiting + busy >= self.max_connections:
            if not waiting:
                conn.close()
                return
            self._drop(sel, next(iter(self._waiting)))  # the oldest waiting connection makes room
        conn.setblocking(False)
        with self._lock:
            self._waiting[conn] = [time.monotonic() + self.idle_timeout, address, b""]
        sel.register(conn, selectors.EVENT_READ)

    def _receive(self, sel, conn) -> None:
        entry = self._waiting[conn]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        entry[2] += data
        state = request_state(entry[2], self.max_body) if data else "gone"
        if state == "incomplete":
            return
        if state != "complete":
            self._drop(sel, conn)
            return
        sel.unregister(conn)
        with self._lock:
            del self._waiting[conn]
            self._busy += 1
        conn.setblocking(True)
        self.received[conn] = entry[2]
        self._pool.submit(self._answer, conn, entry[1])

    def _answer(self, conn, address) -> None:
        try:
            self.finish_request(conn, address)
        except Exception:
            self.handle_error(conn, address)
        finally:
            self.received.pop(conn, None)
            self.shutdown_request(conn)
            with self._lock:
                self._busy -= 1

    def _drop(self, sel, conn) -> None:
        sel.unregister(conn)
        with self._lock:
            del self._waiting[conn]
        conn.close()
