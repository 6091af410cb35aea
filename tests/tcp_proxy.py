"""A small threaded TCP proxy for fault-injection tests (127.0.0.1 only).

``TcpProxy(target)`` listens on 127.0.0.1 (a free port) and forwards every connection to
``target`` (e.g. the moto S3 server). Its behaviour can be changed while clients use it:

- ``forward()``: pass bytes both ways (the initial mode);
- ``drop(connections=None, seconds=None)``: reset (RST) every open connection at once, and
  every new one: the next ``connections`` connections (0: none, only the open ones are
  reset), for ``seconds`` seconds, or (neither given) until ``forward()``;
- ``blackhole(seconds)``: accept connections and keep existing ones open, but forward
  nothing for ``seconds`` seconds (``math.inf``: until ``forward()``), then resume with
  whatever was held back;
- ``cut(after_bytes, responses=1)``: forward only the first ``after_bytes`` bytes of the
  response to each of the next ``responses`` requests (``None``: every request until
  ``forward()``), then reset that connection: a response broken off mid-body;
- ``on_request(n, action, match=None)``: call ``action(request_line)`` (e.g.
  ``lambda _: proxy.drop(connections=2)``) just before the ``n``-th HTTP request from now
  (counting only request lines that ``re.search(match, line)`` finds, if given) is
  forwarded; faults can thus be placed at an exact point of a client's work, whichever
  process or thread makes the request. The request that fires it is subject to the fault.

Requests are counted by the method token at the start of a chunk sent by the client
(``GET /...``), which is exact for HTTP/1.1 clients that send one request at a time per
connection (botocore/aiohttp do). ``requests`` lists their request lines.

Use as a context manager; ``stop()`` closes every socket and joins every thread, and
raises if one of them is still alive.
"""

from __future__ import annotations

import contextlib
import math
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ", b"PATCH ", b"OPTIONS ")
LOOPBACK = ("127.0.0.1", "localhost")


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the peer sees 'connection reset'."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """A controllable TCP forwarder from 127.0.0.1:<free port> to ``target``."""

    def __init__(self, target: str | tuple[str, int], *, poll: float = 0.02) -> None:
        if isinstance(target, str):
            parts = urlsplit(target if "://" in target else f"tcp://{target}")
            host, port = parts.hostname or "", parts.port or 0
        else:
            host, port = target
        if host not in LOOPBACK:
            raise ValueError(f"TcpProxy forwards to 127.0.0.1 only, not {host!r}")
        self.target = ("127.0.0.1", int(port))
        self.poll = poll
        self._cond = threading.Condition(threading.RLock())
        self._mode = "pass"
        self._drop_left: int | None = None      # drop: new connections still to reset
        self._drop_until = math.inf             # drop: until this monotonic time
        self._hole_until = 0.0                  # blackhole: until this monotonic time
        self._generation = 0                    # bumped by drop(): open connections reset
        self._open: dict[int, int] = {}         # thread ident -> generation of each open connection
        self._triggers: list[list] = []         # [requests still to see, pattern, action]
        self._cut_bytes = 0                     # cut: response bytes to pass before the reset
        self._cut_left: int | None = 0          # cut: requests still to cut (None: all)
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._listener: socket.socket | None = None
        self._in_conn = threading.local()
        # statistics
        self.accepted = 0       # connections accepted from clients
        self.refused = 0        # new connections reset because of drop()
        self.reset_open = 0     # open connections reset because of drop()
        self.cut_responses = 0  # responses broken off by cut()
        self.requests: list[str] = []  # request lines seen, in order

    # -- life cycle -------------------------------------------------------------------
    def start(self) -> TcpProxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._listener = listener
        self._port = int(listener.getsockname()[1])
        self._spawn(self._accept_loop, "tcp-proxy-accept")
        return self

    @property
    def port(self) -> int:
        assert self._listener is not None, "start() the proxy first"
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        while self.alive_threads() and time.monotonic() < deadline:  # again: the accept loop may add one
            for thread in self.alive_threads():
                thread.join(max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
        alive = self.alive_threads()
        if alive:
            raise RuntimeError(f"TcpProxy: threads still alive after stop: {[t.name for t in alive]}")

    def alive_threads(self) -> list[threading.Thread]:
        return [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control ----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        with self._cond:
            return self._effective_mode()

    @property
    def open_connections(self) -> int:
        with self._cond:
            return len(self._open)

    @property
    def request_count(self) -> int:
        with self._cond:
            return len(self.requests)

    def forward(self) -> None:
        """Pass bytes both ways (ends any drop or blackhole)."""
        with self._cond:
            self._mode, self._drop_left, self._drop_until, self._hole_until = "pass", None, math.inf, 0.0
            self._cut_left = 0
            self._cond.notify_all()

    def set_mode(self, mode: str, **kwargs: float | int | None) -> None:
        """``set_mode("pass")``, ``set_mode("drop", connections=2)``, ``set_mode("blackhole", seconds=3)``,
        ``set_mode("cut", after_bytes=1000)``."""
        if mode == "pass":
            self.forward()
        elif mode == "drop":
            self.drop(**kwargs)  # type: ignore[arg-type]
        elif mode == "blackhole":
            self.blackhole(**kwargs)  # type: ignore[arg-type]
        elif mode == "cut":
            self.cut(**kwargs)  # type: ignore[arg-type]
        else:
            raise ValueError(f"mode: expected pass, drop, blackhole or cut, found {mode!r}")

    def drop(self, connections: int | None = None, seconds: float | None = None, *, wait: float = 2.0) -> None:
        """Reset every open connection now, and new ones: the next ``connections``, for
        ``seconds``, or (neither given) until ``forward()``. Returns once the open
        connections are closed (unless called from inside the proxy, e.g. by a trigger)."""
        with self._cond:
            self._mode = "drop"
            self._drop_left = connections
            self._drop_until = time.monotonic() + seconds if seconds is not None else math.inf
            self._hole_until = 0.0
            self._generation += 1
            generation = self._generation
            self._cond.notify_all()
            if getattr(self._in_conn, "active", False):
                return
            deadline = time.monotonic() + wait
            while any(g < generation for g in self._open.values()) and time.monotonic() < deadline:
                self._cond.wait(self.poll)

    def blackhole(self, seconds: float = math.inf) -> None:
        """Forward nothing for ``seconds`` (connections are accepted and kept), then resume."""
        with self._cond:
            self._mode = "blackhole"
            self._hole_until = time.monotonic() + seconds
            self._drop_left, self._drop_until = None, math.inf
            self._cond.notify_all()

    def cut(self, after_bytes: int, responses: int | None = 1) -> None:
        """Break off the responses to the next ``responses`` requests (``None``: all, until
        ``forward()``) after ``after_bytes`` bytes, with a reset."""
        with self._cond:
            self._cut_bytes, self._cut_left = after_bytes, responses

    def on_request(self, n: int, action: Callable[[str], object], match: str | None = None) -> None:
        """Call ``action(request_line)`` just before the ``n``-th request from now (n >= 1)
        whose request line ``match`` finds (any request if None) is forwarded."""
        if n < 1:
            raise ValueError("n: expected >= 1")
        with self._cond:
            self._triggers.append([n, re.compile(match) if match else None, action])

    # -- internals --------------------------------------------------------------------
    def _effective_mode(self) -> str:
        now = time.monotonic()
        if self._mode == "drop" and (self._drop_left == 0 or now >= self._drop_until):
            self._mode = "pass"
        if self._mode == "blackhole" and now >= self._hole_until:
            self._mode = "pass"
        return self._mode

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._cond:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping:
            ready, _, _ = select.select([listener], [], [], self.poll)
            if not ready:
                continue
            try:
                client, _ = listener.accept()
            except OSError:
                continue
            with self._cond:
                self.accepted += 1
                if self._stopping or self._effective_mode() == "drop":
                    self.refused += 1
                    if self._drop_left is not None:
                        self._drop_left -= 1
                    _reset(client)
                    continue
            self._spawn(self._serve, f"tcp-proxy-conn-{self.accepted}", client)

    def _count_request(self, data: bytes) -> int | None:
        """Note a request and run the triggers it makes due (outside the lock); returns the
        response bytes to pass before a reset if this request's response is to be cut."""
        line = data.split(b"\r\n", 1)[0].decode("latin-1")
        due = []
        with self._cond:
            self.requests.append(line)
            for trigger in self._triggers:
                if trigger[1] is None or trigger[1].search(line):
                    trigger[0] -= 1
                    if trigger[0] == 0:
                        due.append(trigger[2])
            self._triggers = [t for t in self._triggers if t[0] > 0]
        for action in due:
            action(line)
        with self._cond:
            if self._cut_left is None or self._cut_left > 0:
                if self._cut_left is not None:
                    self._cut_left -= 1
                return self._cut_bytes
        return None

    def _serve(self, client: socket.socket) -> None:
        """One client connection: forward both ways as the mode allows, until either side
        closes, a drop() resets it, a cut() breaks it off, or the proxy stops."""
        me = threading.get_ident()
        self._in_conn.active = True
        with self._cond:
            self._open[me] = generation = self._generation
        upstream: socket.socket | None = None
        to_upstream, to_client = bytearray(), bytearray()
        budget: int | None = None  # bytes of the current response still to pass before a cut
        client_done = upstream_done = graceful = False
        try:
            client.settimeout(5)
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    if self._generation != generation:
                        self.reset_open += 1
                        break
                    if self._effective_mode() == "blackhole":
                        self._cond.wait(min(self.poll * 5, max(0.0, self._hole_until - time.monotonic())))
                        continue
                if to_upstream:
                    if upstream is None:
                        upstream = socket.create_connection(self.target, timeout=5)
                    upstream.sendall(to_upstream)
                    to_upstream.clear()
                if to_client:
                    if budget is not None and len(to_client) >= budget:
                        client.sendall(to_client[:budget])
                        with self._cond:
                            self.cut_responses += 1
                        break  # reset, mid-response
                    client.sendall(to_client)
                    if budget is not None:
                        budget -= len(to_client)
                    to_client.clear()
                if client_done or upstream_done:
                    graceful = True
                    break
                readable, _, _ = select.select([client] + ([upstream] if upstream else []), [], [], self.poll)
                for sock in readable:
                    data = sock.recv(65536)
                    if sock is client:
                        if not data:
                            client_done = True
                        elif data.startswith(METHODS):
                            budget = self._count_request(data)
                            to_upstream += data
                        else:
                            to_upstream += data
                    elif data:
                        to_client += data
                    else:
                        upstream_done = True
        except OSError:
            graceful = False
        finally:
            if graceful:
                with contextlib.suppress(OSError):
                    client.close()
            else:
                _reset(client)
            if upstream is not None:
                with contextlib.suppress(OSError):
                    upstream.close()
            with self._cond:
                self._open.pop(me, None)
                self._cond.notify_all()
