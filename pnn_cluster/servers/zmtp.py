"""The server side of ZMTP 3.x on plain sockets: a ROUTER endpoint whose memory and time are bounded.

Why not libzmq: a libzmq ROUTER socket buffers a whole multipart message
before the application sees its first frame and can only limit the size of
one frame (``ZMQ_MAXMSGSIZE``), so a peer can make a server hold any number
of frames just under that limit. Here frames are read one at a time and every
limit is checked from a frame's header, before its body is read or any memory
is set aside for it.

What is spoken (any unmodified ZeroMQ DEALER, REQ or ROUTER peer connects):

* ZMTP 3.1 (rfc.zeromq.org/spec/37; 3.0 peers too, spec 23): the 64-byte
  greeting, frames with the MORE, LONG and COMMAND flags, the READY command
  with ``Socket-Type`` metadata, PING answered with PONG.
* the NULL mechanism, or CURVE (spec 25, ZMTP-CURVE, with the CurveZMQ
  handshake of spec 26): HELLO, WELCOME with a cookie, INITIATE with the
  client's vouch, READY, then every frame as an encrypted MESSAGE. A client
  is admitted only if its long-term public key is on the allow-list;
  otherwise it gets an ERROR command and is disconnected.

What the server guarantees (:class:`Limits`):

* Strangers hold no slot a key holder needs. Connections still in their
  handshake (under CURVE: everyone whose key has not been checked) have a
  budget of their own, ``max_handshakes``, at most
  ``max_handshakes_per_source`` of them from one address, and
  ``handshake_timeout_s`` to finish. A new connection that finds the budget
  (or its address's share) full evicts the handshaking connection that has
  got least far (nothing sent < a greeting < each handshake command), the
  oldest of those; an authenticated connection is never evicted. At most
  ``max_connections`` connections are past their handshake; one more is
  closed when its handshake ends.
* Memory grows only with bytes that have arrived: a frame's buffer grows as
  its body arrives (at most doubling), never from what its header declares.
  Everything held for clients (read buffers, frames arriving, requests being
  received or handled, decrypted copies, replies not yet sent, each buffer
  with Python's own overhead) counts against one server-wide budget,
  ``max_held_bytes``. A read that would exceed it first drops the
  connection holding the most incomplete input; if no connection holds
  any, reading pauses until replies drain.
* A request (one multipart message) holds at most ``max_frames`` frames and
  ``max_message_bytes`` bytes in all, checked while it arrives, and must
  arrive within ``request_timeout_s`` of its first byte; a connection that
  does nothing for ``idle_timeout_s`` is closed; a connection has at most one
  request being handled, and no new request is read from it while more than
  ``max_pending_reply_bytes`` of replies (counted as memory held) wait to be
  sent to it (a reply that makes no progress for ``request_timeout_s`` drops
  the connection).

A peer that breaks a limit is disconnected (counted by reason in
:attr:`RouterServer.stats`); the others keep being served.

What still costs: a stranger may complete CURVE's first step (HELLO, which
needs no key) as often as it likes; each costs the server one public-key
operation, and a handshake that got further is evicted only after such ones.

Threads: one I/O thread runs every connection (non-blocking sockets, one
selector, a state machine per connection). Complete requests go into
:attr:`RouterServer.requests` in the order they complete; whoever handles
them answers with :meth:`RouterServer.reply` from any thread.

Pieces: this module is the I/O thread, admission and the memory budget;
the limits and each connection's state are :mod:`.zmtp_state`; the wire
format is :mod:`.zmtp_codec`, the NULL and CURVE handshakes and per-frame
encryption :mod:`.zmtp_security`, key files :mod:`.curve_keys`, binding
:mod:`.listeners`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import selectors
import socket
import threading
import time
from collections import deque
from typing import Any

from pnn_cluster.servers.curve_keys import CurveKeyError, CurveKeys, load_curve_keys, read_key_file
from pnn_cluster.servers.listeners import Listener, listen
from pnn_cluster.servers.zmtp_codec import (
    DROP_REASONS,
    FLAG_COMMAND,
    FLAG_LONG,
    FLAG_MORE,
    GREETING,
    GREETING_LEN,
    HANDSHAKE_FRAME_MAX,
    READY,
    Drop,
    as_bytes_view,
    check_greeting,
    command,
    greeting,
)
from pnn_cluster.servers.zmtp_security import mechanism_for
from pnn_cluster.servers.zmtp_state import (
    GREETED,
    READ_CHUNK,
    SILENT,
    SPOKE,
    Conn,
    Limits,
    Request,
    least_along,
)

__all__ = [
    "CurveKeyError", "CurveKeys", "DROP_REASONS", "Limits", "Listener", "Request", "RouterServer", "listen",
    "load_curve_keys", "read_key_file",
]

log = logging.getLogger(__name__)

#: bytes read from one connection before the others get their turn
READ_BUDGET = 4 << 20
SEND_IOV = 64
#: connections accepted before the open ones are served again (strangers reconnecting as fast as they are
#: evicted would otherwise keep the I/O thread accepting)
ACCEPT_BATCH = 16


class RouterServer:
    """Serves a :class:`Listener` in one I/O thread; complete requests appear in :attr:`requests`."""

    def __init__(self, listener: Listener, limits: Limits, curve: CurveKeys | None = None, name: str = "zmtp") -> None:
        self.listener = listener
        self.limits = limits
        self.curve = curve
        self.name = name
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.stats: dict[str, Any] = {"connections": 0, "connections_accepted": 0, "abandoned": 0, "held_bytes": 0,
                                      "dropped": dict.fromkeys(DROP_REASONS, 0)}
        self._conns: dict[int, Conn] = {}
        self._paused: set[int] = set()  # connections not read until the held bytes fall within the budget
        self._round = 0  # of the I/O loop: a connection accepted in this one has not yet had its bytes read
        self._ids = itertools.count(1)
        self._replies: deque[tuple[Request, list[Any]]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sel: selectors.BaseSelector | None = None
        self.mechanism = mechanism_for(curve)
        self._greeting = greeting(self.mechanism.name, as_server=curve is not None)

    # -- threads ------------------------------------------------------------------------------------

    def start(self) -> RouterServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"{self.name}-io", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close the listener and every connection; requests not yet answered are cancelled."""
        self._stopping = True
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        else:
            self.listener.close()
        for sock in (self._wake_r, self._wake_w):
            sock.close()

    def reply(self, request: Request, frames: list[Any]) -> None:
        """Send ``frames`` (one multipart message) to the peer that sent ``request``; any thread may call this."""
        self._replies.append((request, frames))
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self.listener.sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stopping:
                events = sel.select(self._select_timeout())
                now = time.monotonic()
                self._round += 1
                # the open connections first: a handshake that has begun gets its bytes read before a new
                # connection may evict it as one that has sent nothing
                events.sort(key=lambda event: event[0].fileobj is self.listener.sock)
                for key, mask in events:
                    if key.fileobj is self.listener.sock:
                        self._accept(now)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        conn = key.data
                        if not conn.closed and mask & selectors.EVENT_WRITE:
                            self._guard(conn, self._flush, conn, now)
                            if not conn.closed and conn.rbuf:  # requests held back while replies were queued
                                self._guard(conn, self._feed, conn, now)
                                self._interest(conn)
                        if not conn.closed and mask & selectors.EVENT_READ:
                            self._guard(conn, self._on_readable, conn, now)
                self._take_replies(time.monotonic())
                self._resume_paused()
                self.stats["held_bytes"] = self._held()
                self._check_timers(time.monotonic())
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()
            self.listener.close()

    def _guard(self, conn: Conn, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Drop as exc:
            if exc.farewell:
                with contextlib.suppress(OSError):
                    conn.sock.send(exc.farewell)
            self._drop(conn, exc.reason)
        except OSError:
            self._close(conn)  # reset by the peer, broken pipe
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: connection %d dropped after an unexpected error", self.name, conn.id)
            self._drop(conn, "protocol")

    # -- bookkeeping --------------------------------------------------------------------------------

    def _accept(self, now: float) -> None:
        for _ in range(ACCEPT_BATCH):  # then the connections already open get their turn
            try:
                sock, addr = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, a connection reset before accept
                return
            source = addr[0] if isinstance(addr, tuple) and addr else "local"
            if not self._make_room(source):
                self.stats["dropped"]["connection_cap"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(next(self._ids), sock, now, source)
            conn.round = self._round
            self._conns[conn.id] = conn
            self.stats["connections"] = len(self._conns)
            self.stats["connections_accepted"] += 1
            self._queue(conn, [self._greeting])
            self._guard(conn, self._flush, conn, now)
            self._interest(conn)

    def _make_room(self, source: str) -> bool:
        """Room for one more connection in its handshake: evict the handshaking connection that has got least
        far (the oldest of those) from ``source``'s share if that is full, else from the whole budget if full.
        If that one was accepted in this round of the I/O loop (it has not been read yet: it had no chance to
        get further), the new connection is refused instead: False."""
        lim = self.limits
        shaking = [c for c in self._conns.values() if c.state != READY]
        mine = [c for c in shaking if c.source == source]
        full = mine if len(mine) >= lim.max_handshakes_per_source else \
            shaking if len(shaking) >= lim.max_handshakes else None
        if full is None:
            return True
        victim = min(full, key=least_along)
        if victim.round == self._round:
            return False
        self._drop(victim, "handshake_evicted")
        return True

    def _authenticated(self, conn: Conn) -> None:
        """``conn`` has finished its handshake: it takes one of the ``max_connections`` places, if one is free."""
        ready = sum(1 for c in self._conns.values() if c.state == READY and c is not conn)
        if ready >= self.limits.max_connections:
            raise Drop("connection_cap", f"{ready} connections already")

    def _held(self) -> int:
        return sum(c.held() for c in self._conns.values())

    def _within_budget(self, reader: Conn, need: int) -> bool:
        """May ``reader`` take ``need`` more bytes? Over the budget, the connection holding the most incomplete
        input goes first (which may be ``reader``: then False); with none to drop, ``reader`` pauses."""
        budget = self.limits.max_held_bytes
        while not reader.closed:
            if self._held() + need <= budget:
                return True
            victim = max(self._conns.values(), key=Conn.incomplete)
            if victim.incomplete() == 0:
                self._paused.add(reader.id)
                self._interest(reader)
                return False
            self._drop(victim, "memory_budget")
        return False

    def _resume_paused(self) -> None:
        for cid in list(self._paused):
            conn = self._conns.get(cid)
            if conn is None or self._held() + READ_CHUNK <= self.limits.max_held_bytes:
                self._paused.discard(cid)
                if conn is not None:
                    self._interest(conn)

    def _drop(self, conn: Conn, reason: str) -> None:
        self.stats["dropped"][reason] += 1
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.events and self._sel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)
        conn.events = 0
        with contextlib.suppress(OSError):
            conn.sock.close()
        if conn.request is not None:
            conn.request.cancelled = True
            conn.request = None
        conn.out.clear()
        conn.parts = []
        conn.body = None
        conn.rbuf = bytearray()
        conn.parts_bytes = conn.out_bytes = 0
        self._conns.pop(conn.id, None)
        self._paused.discard(conn.id)
        self.stats["connections"] = len(self._conns)

    def _interest(self, conn: Conn) -> None:
        if conn.closed or self._sel is None:
            return
        mask = 0
        if conn.request is None and conn.out_held() <= self.limits.max_pending_reply_bytes \
                and conn.id not in self._paused:
            mask |= selectors.EVENT_READ
        if conn.out:
            mask |= selectors.EVENT_WRITE
        if mask == conn.events:
            return
        if conn.events == 0:
            self._sel.register(conn.sock, mask, conn)
        elif mask == 0:
            self._sel.unregister(conn.sock)
        else:
            self._sel.modify(conn.sock, mask, conn)
        conn.events = mask

    def _select_timeout(self) -> float:
        if not self._conns:
            return 1.0
        now = time.monotonic()
        return max(0.0, min(1.0, min(self._deadline(c) for c in self._conns.values()) - now))

    def _deadline(self, conn: Conn) -> float:
        lim = self.limits
        if conn.state != READY:
            return conn.created + lim.handshake_timeout_s
        if conn.out:
            return conn.last_write + lim.request_timeout_s
        if conn.msg_started is not None:
            return conn.msg_started + lim.request_timeout_s
        if conn.request is not None:
            return float("inf")  # the device is working on it
        return conn.last_activity + lim.idle_timeout_s

    def _check_timers(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if now < self._deadline(conn):
                continue
            if conn.state != READY:
                self._drop(conn, "handshake")
            elif conn.out:
                self._drop(conn, "reply_timeout")
            elif conn.msg_started is not None:
                self._drop(conn, "request_timeout")
            else:
                self._drop(conn, "idle_timeout")

    # -- sending ------------------------------------------------------------------------------------

    def _queue(self, conn: Conn, buffers: list[Any]) -> None:
        for b in buffers:
            mv = as_bytes_view(b)
            if mv.nbytes:
                conn.out.append(mv)
                conn.out_bytes += mv.nbytes

    def _flush(self, conn: Conn, now: float) -> None:
        while conn.out:
            try:
                n = conn.sock.sendmsg(list(itertools.islice(conn.out, SEND_IOV)))
            except (BlockingIOError, InterruptedError):
                break
            conn.out_bytes -= n
            conn.last_write = conn.last_activity = now
            while n:
                head = conn.out[0]
                if head.nbytes <= n:
                    n -= head.nbytes
                    conn.out.popleft()
                else:
                    conn.out[0] = head[n:]
                    n = 0
        self._interest(conn)

    def _take_replies(self, now: float) -> None:
        while self._replies:
            request, frames = self._replies.popleft()
            conn = self._conns.get(request.conn_id)
            if conn is None or conn.request is not request:
                continue  # its connection is gone
            conn.request = None
            self._guard(conn, self._send_message, conn, frames, now)
            if not conn.closed:
                self._guard(conn, self._feed, conn, now)  # a request that arrived meanwhile
            if not conn.closed:
                self._interest(conn)

    def _send_message(self, conn: Conn, frames: list[Any], now: float) -> None:
        views = [as_bytes_view(f) for f in frames] or [memoryview(b"")]
        last = len(views) - 1
        for i, mv in enumerate(views):
            self._queue(conn, self.mechanism.seal(conn, FLAG_MORE if i < last else 0, mv))
        self._flush(conn, now)

    def _send_command(self, conn: Conn, name: bytes, data: bytes) -> None:
        frames = self.mechanism.seal_command(conn, name, data) if conn.state == READY else [command(name, data)]
        self._queue(conn, frames)

    def _send_handshake(self, conn: Conn, frames: list[bytes]) -> None:
        if frames:
            self._queue(conn, frames)
            self._flush(conn, time.monotonic())

    # -- receiving ----------------------------------------------------------------------------------

    def _on_readable(self, conn: Conn, now: float) -> None:
        budget = READ_BUDGET
        while budget > 0 and not conn.closed and conn.request is None:
            body = conn.body
            grow = 0
            if body is not None and conn.filled == len(body):  # full: at most double it, to what was declared
                grow = min(conn.body_size - conn.filled, max(READ_CHUNK, conn.filled))
            if not self._within_budget(conn, grow if body is not None else READ_CHUNK):
                return
            try:
                if body is not None:
                    if grow:
                        body += bytes(grow)
                    n = conn.sock.recv_into(memoryview(body)[conn.filled:])
                else:
                    data = conn.sock.recv(READ_CHUNK)
                    n = len(data)
            except (BlockingIOError, InterruptedError):
                break
            if n == 0:  # the peer closed
                self._close(conn)
                return
            budget -= n
            conn.last_activity = now
            if conn.progress == SILENT:
                conn.progress = SPOKE
            if body is not None:
                conn.filled += n
                if conn.filled < conn.body_size:
                    continue
                conn.body = None
                self._on_frame(conn, conn.body_flags, body, now)
            else:
                conn.rbuf += data
            self._feed(conn, now)
        self._interest(conn)

    def _feed(self, conn: Conn, now: float) -> None:
        """Take every complete greeting or frame from the read buffer (none while a request is being handled)."""
        rbuf = conn.rbuf
        cap = self.limits.max_pending_reply_bytes
        while not conn.closed and conn.request is None and conn.body is None and conn.out_held() <= cap:
            if conn.state == GREETING:
                if rbuf and rbuf[0] != 0xFF:
                    raise Drop("handshake", "not a ZMTP greeting")
                if len(rbuf) < GREETING_LEN:
                    return
                peer_greeting = bytes(rbuf[:GREETING_LEN])
                del rbuf[:GREETING_LEN]
                check_greeting(peer_greeting, self.mechanism.name)
                conn.progress = GREETED
                self._send_handshake(conn, self.mechanism.start(conn))
                continue
            if len(rbuf) < 2:
                return
            flags = rbuf[0]
            if flags & FLAG_LONG:
                if len(rbuf) < 9:
                    return
                size, hlen = int.from_bytes(rbuf[1:9], "big"), 9
            else:
                size, hlen = rbuf[1], 2
            self._check_frame(conn, flags, size, now)
            del rbuf[:hlen]
            if len(rbuf) >= size:
                body = rbuf[:size]  # a copy of its own (writable: numpy arrays viewing it are too)
                del rbuf[:size]
                self._on_frame(conn, flags, body, now)
            else:  # a large frame: read straight into its own buffer, which grows as the body arrives
                conn.body = bytearray(rbuf)
                conn.body_size = size
                conn.filled = len(rbuf)
                conn.body_flags = flags
                rbuf.clear()

    def _check_frame(self, conn: Conn, flags: int, size: int, now: float) -> None:
        """The limits, from a frame's header alone: nothing of its body is read or allocated if it breaks one."""
        if flags & ~(FLAG_MORE | FLAG_LONG | FLAG_COMMAND):
            raise Drop("protocol", f"reserved flag bits {flags:#04x}")
        if conn.state != READY:
            if not flags & FLAG_COMMAND or size > HANDSHAKE_FRAME_MAX:
                raise Drop("handshake", "expected a handshake command")
            return
        lim = self.limits
        payload = self.mechanism.payload_size(conn, flags, size)
        if payload is None:  # a command: no part of a message
            return
        if len(conn.parts) + 1 > lim.max_frames:
            raise Drop("too_many_frames", f"more than {lim.max_frames} frames")
        if conn.parts_bytes + payload > lim.max_message_bytes:
            raise Drop("message_too_large", f"more than {lim.max_message_bytes} bytes")
        if conn.msg_started is None:
            conn.msg_started = now

    def _on_frame(self, conn: Conn, flags: int, body: bytes | bytearray, now: float) -> None:
        if conn.state != READY:
            frames = self.mechanism.handshake(conn, bytes(body))
            conn.progress += 1
            if conn.state == READY:
                self._authenticated(conn)
            self._send_handshake(conn, frames)
            return
        is_command, more, payload = self.mechanism.open(conn, flags, body)
        if is_command:
            if conn.parts:
                raise Drop("protocol", "command inside a message")
            conn.msg_started = None
            self._on_command(conn, bytes(payload))
        else:
            self._on_data(conn, more, payload)

    def _on_data(self, conn: Conn, more: bool, payload: Any) -> None:
        conn.parts.append(payload)
        conn.parts_bytes += len(payload)
        if more:
            return
        request = Request(conn.id, conn.parts, conn.parts_bytes)
        conn.parts, conn.parts_bytes, conn.msg_started = [], 0, None
        conn.request = request
        self.requests.put(request)

    def _on_command(self, conn: Conn, body: bytes) -> None:
        if not body or len(body) < 1 + body[0]:
            raise Drop("protocol", "malformed command")
        name, data = body[1:1 + body[0]], body[1 + body[0]:]
        if name == b"PING":
            if len(data) < 2 or len(data) > 18:
                raise Drop("protocol", "malformed PING")
            self._send_command(conn, b"PONG", data[2:])
            self._flush(conn, time.monotonic())
        elif name == b"ERROR":
            self._close(conn)
        # PONG, SUBSCRIBE, CANCEL and commands of later versions: nothing to do
