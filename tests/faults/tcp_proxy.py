"""A TCP proxy on 127.0.0.1 that can cut or black-hole the network between a client and a server.

Modes (switch at any time with `set_mode`):
- ``pass``:      bytes are forwarded both ways.
- ``cut``:       every open connection is closed (RST) and the listening socket is closed, so new
                 connections are refused, like an unplugged cable with an active firewall.
- ``blackhole``: connections are accepted (and open ones kept) but bytes are read and dropped in
                 both directions; nobody sees an error, only keepalives and timeouts can tell.
                 A connection that was black-holed stays dead: when the mode goes back to ``pass``
                 it is reset, as the far end would do for a connection it has already forgotten.

One selector thread does everything, so mode changes are atomic with respect to forwarding.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

MODES = ("pass", "cut", "blackhole")


@dataclass
class _Pair:
    client: socket.socket
    server: socket.socket | None
    dead: bool = False  # black-holed: drop everything until closed
    out: dict[socket.socket, bytearray] = field(default_factory=dict)  # pending bytes per destination


class TcpProxy:
    """`TcpProxy(target_port).start()`; clients connect to `proxy.port` instead of the target."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = port
        self.mode = "pass"
        self.accepted = 0  # connections accepted so far (a reconnect shows up here)
        self.bytes_forwarded = 0
        self.bytes_dropped = 0
        self._sel = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._pairs: dict[socket.socket, _Pair] = {}
        self._lock = threading.Lock()
        self._pending_mode: str | None = None
        self._done = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="tcp-proxy", daemon=True)

    # -- control (any thread) ------------------------------------------------------------------
    def start(self) -> TcpProxy:
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._listen()
        self._thread.start()
        return self

    def set_mode(self, mode: str, timeout: float = 5.0) -> None:
        """Switch mode; returns once the proxy thread has applied it."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        with self._lock:
            self._done.clear()
            self._pending_mode = mode
            self._wake_w.send(b"x")
            if not self._done.wait(timeout):
                raise TimeoutError(f"proxy did not switch to {mode}")

    def wait_accepted(self, n: int, timeout: float) -> bool:
        """Wait until `n` connections have been accepted in total (e.g. a client reconnected)."""
        deadline = time.monotonic() + timeout
        while self.accepted < n:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    @property
    def connections(self) -> int:
        return len({id(p) for p in self._pairs.values()})

    def close(self) -> None:
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(5)
        for s in list(self._pairs):
            s.close()
        if self._listener is not None:
            self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        self._sel.close()

    # -- proxy thread ----------------------------------------------------------------------------
    def _listen(self) -> None:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(64)
        s.setblocking(False)
        self.port = s.getsockname()[1]
        self._listener = s
        self._sel.register(s, selectors.EVENT_READ, "accept")

    def _apply(self, mode: str) -> None:
        self.mode = mode
        if mode == "cut":
            for pair in {id(p): p for p in self._pairs.values()}.values():
                self._close_pair(pair, reset=True)
            if self._listener is not None:
                self._sel.unregister(self._listener)
                self._listener.close()
                self._listener = None
        elif mode == "blackhole":
            for pair in self._pairs.values():
                pair.dead = True
                pair.out.clear()
            if self._listener is None:
                self._listen()
        else:  # pass
            for pair in {id(p): p for p in self._pairs.values()}.values():
                if pair.dead:
                    self._close_pair(pair, reset=True)
            if self._listener is None:
                self._listen()

    def _loop(self) -> None:
        while not self._stop:
            for key, events in self._sel.select(timeout=0.5):
                if self._stop:
                    return
                if key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    mode, self._pending_mode = self._pending_mode, None
                    if mode is not None:
                        self._apply(mode)
                        self._done.set()
                elif key.data == "accept":
                    self._accept()
                else:
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    pair = self._pairs.get(sock)
                    if pair is None:
                        continue
                    if events & selectors.EVENT_WRITE:
                        self._flush(pair, sock)
                    if events & selectors.EVENT_READ and sock in self._pairs:
                        self._read(pair, sock)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        client.setblocking(False)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.mode == "blackhole":
            pair = _Pair(client, None, dead=True)
        else:
            try:
                server = socket.create_connection(self.target, timeout=2.0)
            except OSError:
                client.close()  # the server is down: the client sees the connection end
                return
            server.setblocking(False)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = _Pair(client, server)
            self._pairs[server] = pair
            self._sel.register(server, selectors.EVENT_READ, "conn")
        self._pairs[client] = pair
        self._sel.register(client, selectors.EVENT_READ, "conn")

    def _other(self, pair: _Pair, sock: socket.socket) -> socket.socket | None:
        return pair.server if sock is pair.client else pair.client

    def _read(self, pair: _Pair, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data and pair.dead:  # a black hole does not carry the FIN to the other side either
            self._close_one(pair, sock)
            return
        if not data:  # orderly close by one side: deliver what is still buffered, then close both
            for dest, buf in pair.out.items():
                if buf and not pair.dead:
                    try:
                        dest.setblocking(True)
                        dest.settimeout(1.0)
                        dest.sendall(buf)
                    except OSError:
                        pass
            self._close_pair(pair, reset=False)
            return
        if pair.dead:
            self.bytes_dropped += len(data)
            return
        other = self._other(pair, sock)
        if other is None:
            return
        buf = pair.out.setdefault(other, bytearray())
        buf += data
        self._flush(pair, other)

    def _flush(self, pair: _Pair, dest: socket.socket) -> None:
        buf = pair.out.get(dest)
        if pair.dead or not buf:
            self._want_write(dest, False)
            return
        try:
            n = dest.send(buf)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close_pair(pair, reset=True)
            return
        self.bytes_forwarded += n
        del buf[:n]
        self._want_write(dest, bool(buf))

    def _want_write(self, sock: socket.socket, on: bool) -> None:
        if sock not in self._pairs:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        if self._sel.get_key(sock).events != events:
            self._sel.modify(sock, events, "conn")

    def _close_one(self, pair: _Pair, sock: socket.socket) -> None:
        if sock in self._pairs:
            del self._pairs[sock]
            self._sel.unregister(sock)
        sock.close()
        if sock is pair.server:
            pair.server = None

    def _close_pair(self, pair: _Pair, reset: bool) -> None:
        for s in (pair.client, pair.server):
            if s is None or s not in self._pairs:
                if s is not None:
                    s.close()
                continue
            del self._pairs[s]
            self._sel.unregister(s)
            if reset:  # RST instead of FIN, like a network that drops the connection state
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
