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

What the server guarantees (:class:`Limits`): a request (one multipart
message) holds at most ``max_frames`` frames and ``max_message_bytes`` bytes
in all, checked while it arrives; at most ``max_connections`` connections;
a request must arrive within ``request_timeout_s`` of its first byte, a
handshake within ``request_timeout_s`` of the connection; a connection that
does nothing for ``idle_timeout_s`` is closed; a connection has at most one
request being handled, and no new request is read from it while more than
``max_pending_reply_bytes`` of replies wait to be sent to it (a reply that
makes no progress for ``request_timeout_s`` drops the connection). A peer
that breaks a limit is disconnected (counted by reason in
:attr:`RouterServer.stats`); the others keep being served. The memory held
for clients is thus at most about ``max_connections * (max_message_bytes +
max_pending_reply_bytes + one reply)``.

Threads: one I/O thread runs every connection (non-blocking sockets, one
selector, a state machine per connection). Complete requests go into
:attr:`RouterServer.requests` in the order they complete; whoever handles
them answers with :meth:`RouterServer.reply` from any thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import re
import selectors
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.utils
import zmq.utils.z85

from pnn_cluster.servers import BindError

__all__ = [
    "CurveKeyError", "CurveKeys", "DROP_REASONS", "Limits", "Listener", "Request", "RouterServer", "listen",
    "load_curve_keys", "read_key_file",
]

log = logging.getLogger(__name__)

MIB = 1 << 20
GREETING_LEN = 64
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04
#: largest command frame accepted during a handshake (HELLO is 200 bytes, INITIATE 257 + metadata)
HANDSHAKE_FRAME_MAX = 16 * 1024
#: largest command frame accepted after it (PING is at most 24 bytes)
COMMAND_FRAME_MAX = 4 * 1024
#: what CURVE adds to each frame: "\x07MESSAGE", the short nonce, the MAC and the flags byte
CURVE_OVERHEAD = 8 + 8 + 16 + 1
PEER_SOCKET_TYPES = frozenset({b"DEALER", b"REQ", b"ROUTER"})
READ_CHUNK = 64 * 1024
#: bytes read from one connection before the others get their turn
READ_BUDGET = 4 * MIB
SEND_IOV = 64
LISTEN_BACKLOG = 64

#: why connections were closed by the server (keys of ``stats["dropped"]``)
DROP_REASONS = (
    "message_too_large", "too_many_frames", "request_timeout", "reply_timeout", "idle_timeout",
    "connection_cap", "handshake", "unauthorized", "protocol",
)


class CurveKeyError(BindError):
    """A CURVE key file that cannot be used: the server refuses to start rather than lock clients out."""


@dataclass(frozen=True)
class Limits:
    """What one peer may cost the server; see the module docstring for what each bounds."""

    max_message_bytes: int = 256 * MIB
    max_frames: int = 258
    max_connections: int = 16
    idle_timeout_s: float = 300.0
    request_timeout_s: float = 30.0
    max_pending_reply_bytes: int = 16 * MIB

    def __post_init__(self) -> None:
        ints = {"max_message_bytes": (1, 2**40), "max_frames": (1, 1 << 20), "max_connections": (1, 4096),
                "max_pending_reply_bytes": (0, 2**40)}
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
                raise BindError(f"{name}: {v!r}; allowed: integers {lo}..{hi}")
        for name in ("idle_timeout_s", "request_timeout_s"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 86400):
                raise BindError(f"{name}: {v!r}; allowed: seconds, 0 < s <= 86400")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- CURVE keys ---------------------------------------------------------------------------------------

_Z85_ALPHABET = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")
_KEY_LINE = re.compile(r'(public-key|secret-key)\s*=\s*"([^"]*)"')


def _z85_key(path: Path, what: str, lineno: int, text: str) -> bytes:
    where = f"curve: key file {path} line {lineno}: {what}"
    if len(text) != 40:
        raise CurveKeyError(f"{where} has {len(text)} characters; allowed: a 40-character Z85 key "
                            "(as written by zmq.auth.create_certificates)")
    bad = sorted(set(text) - _Z85_ALPHABET)
    if bad:
        raise CurveKeyError(f"{where} has character(s) {''.join(bad)!r} outside Z85; allowed: a 40-character Z85 key")
    try:
        key = zmq.utils.z85.decode(text)
    except Exception as exc:  # an out-of-range group
        raise CurveKeyError(f"{where} is not valid Z85 ({exc}); allowed: a 40-character Z85 key") from None
    return key


def read_key_file(path: str | Path, *, secret: bool = False) -> tuple[bytes, bytes | None]:
    """A ``zmq.auth`` certificate file -> (public key, secret key or None), 32 raw bytes each.

    Anything wrong (unreadable, no key, a key that is not 40 Z85 characters,
    a key given twice, a secret that does not match the public key) raises
    :class:`CurveKeyError` naming the file, the line and the problem.
    """
    path = Path(path)
    try:
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurveKeyError(f"curve: key file {path}: cannot read it ({exc})") from None
    found: dict[str, tuple[int, str]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = _KEY_LINE.fullmatch(s)
        if m is None:
            if s.startswith(("public-key", "secret-key")):
                raise CurveKeyError(f"curve: key file {path} line {lineno}: cannot parse {s[:60]!r}; "
                                    'allowed: public-key = "<40 Z85 characters>"')
            continue
        if m[1] in found:
            raise CurveKeyError(f"curve: key file {path} line {lineno}: a second {m[1]} "
                                f"(the first is on line {found[m[1]][0]}); allowed: one")
        found[m[1]] = (lineno, m[2])
    if "public-key" not in found:
        raise CurveKeyError(f'curve: key file {path}: no public-key = "..." line; allowed: a certificate file '
                            "written by zmq.auth.create_certificates")
    public = _z85_key(path, "public-key", *found["public-key"])
    if not secret:
        return public, None
    if "secret-key" not in found:
        raise CurveKeyError(f'curve: key file {path}: no secret-key = "..." line; allowed: the <name>.key_secret '
                            "file written by zmq.auth.create_certificates")
    secret_key = _z85_key(path, "secret-key", *found["secret-key"])
    if bytes(nacl.public.PrivateKey(secret_key).public_key) != public:
        raise CurveKeyError(f"curve: key file {path}: its secret-key does not belong to its public-key")
    return public, secret_key


@dataclass(frozen=True)
class CurveKeys:
    """The server's long-term key pair and the long-term public keys of the clients it admits."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]
    sources: tuple[str, ...] = field(default=(), compare=False)


def load_curve_keys(secret_key_file: str | Path, allowed_clients_dir: str | Path) -> CurveKeys:
    """Read the server's key pair and every ``*.key`` file of the allow-list; a bad file is an error, not a skip."""
    public, secret = read_key_file(secret_key_file, secret=True)
    assert secret is not None
    directory = Path(allowed_clients_dir)
    if not directory.is_dir():
        raise CurveKeyError(f"curve: allowed clients directory {directory} does not exist")
    files = sorted(p for p in directory.glob("*.key") if p.is_file())
    if not files:
        raise CurveKeyError(f"curve: no client public keys (*.key) in {directory}")
    allowed = frozenset(read_key_file(p)[0] for p in files)
    return CurveKeys(public, secret, allowed, tuple(str(p) for p in files))


# -- listening -------------------------------------------------------------------------------------------


@dataclass
class Listener:
    """A bound, listening socket and the endpoint a client connects to."""

    sock: socket.socket
    endpoint: str
    path: str | None = None  # an ipc socket file, removed on close
    tempdir: str | None = None
    closed: bool = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.sock.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
        if self.tempdir is not None:
            shutil.rmtree(self.tempdir, ignore_errors=True)


def listen(endpoint: str) -> Listener:
    """Bind and listen: ``tcp://HOST:PORT`` (PORT ``*`` or 0: any free port; HOST ``*``: every IPv4
    interface) or ``ipc://PATH`` (a Unix socket; ``ipc://*``: a fresh temporary path; ``ipc://@NAME``:
    Linux abstract namespace). The returned endpoint names the port or path actually bound."""
    scheme, sep, addr = endpoint.partition("://")
    try:
        if sep and scheme == "tcp":
            return _listen_tcp(endpoint, addr)
        if sep and scheme == "ipc":
            return _listen_ipc(endpoint, addr)
    except OSError as exc:
        raise BindError(f"bind: cannot bind {endpoint}: {exc}") from None
    raise BindError(f"bind: {endpoint!r}: transport not served; allowed: tcp://HOST:PORT, ipc://PATH")


def _listen_tcp(endpoint: str, addr: str) -> Listener:
    host, sep, port_s = addr.rpartition(":")
    if not sep or not host:
        raise BindError(f"bind: {endpoint!r} has no port; allowed: tcp://HOST:PORT (PORT 0 or * for any)")
    port = 0 if port_s in ("*", "0") else int(port_s) if port_s.isdigit() else -1
    if not 0 <= port < 65536:
        raise BindError(f"bind: port {port_s!r}; allowed: 1..65535, 0 or *")
    h = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if h == "*":
        family, sockaddr = socket.AF_INET, ("0.0.0.0", port)
    else:
        infos = socket.getaddrinfo(h, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        # like libzmq without ZMQ_IPV6: a name resolves to IPv4 where it can; an IPv6 literal stays IPv6
        infos.sort(key=lambda i: i[0] != socket.AF_INET)
        family, sockaddr = infos[0][0], infos[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # rebind at once after a restart
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    ip, bound = sock.getsockname()[:2]
    return Listener(sock, f"tcp://[{ip}]:{bound}" if family == socket.AF_INET6 else f"tcp://{ip}:{bound}")


def _listen_ipc(endpoint: str, path: str) -> Listener:
    tempdir = None
    if path == "*":
        tempdir = tempfile.mkdtemp(prefix="pnn-zmtp-")
        path = os.path.join(tempdir, "socket")
    if not path:
        raise BindError(f"bind: {endpoint!r} has no path; allowed: ipc://PATH, ipc://*")
    abstract = path.startswith("@")
    if not abstract and os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BindError(f"bind: cannot bind {endpoint}: {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a socket file left behind by a server that is gone
        else:
            raise BindError(f"bind: cannot bind {endpoint}: another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + path[1:] if abstract else path)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        if tempdir is not None:
            shutil.rmtree(tempdir, ignore_errors=True)
        raise
    return Listener(sock, f"ipc://{path}", None if abstract else path, tempdir)


# -- connections -------------------------------------------------------------------------------------------


class Request:
    """One complete multipart message from a peer (``frames``), waiting for its reply."""

    __slots__ = ("conn_id", "frames", "cancelled")

    def __init__(self, conn_id: int, frames: list[Any]) -> None:
        self.conn_id = conn_id
        self.frames = frames
        self.cancelled = False  # set when its connection closes before the reply is sent


class _Drop(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


_GREETING, _HELLO, _INITIATE, _NULL_READY, _READY = "greeting", "hello", "initiate", "ready-cmd", "ready"


class _Conn:
    """One peer: its socket, what has been read of its current frame and message, what waits to be sent."""

    def __init__(self, cid: int, sock: socket.socket, now: float) -> None:
        self.id = cid
        self.sock = sock
        self.state = _GREETING
        self.closed = False
        self.events = 0
        self.rbuf = bytearray()
        self.body: bytearray | None = None  # the body of a frame too large for rbuf, being filled
        self.filled = 0
        self.body_flags = 0
        self.parts: list[Any] = []
        self.parts_bytes = 0
        self.msg_started: float | None = None
        self.request: Request | None = None
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.created = self.last_activity = self.last_write = now
        # CURVE
        self.client_transient: bytes = b""
        self.transient: nacl.public.PrivateKey | None = None
        self.cookie_key = b""
        self.shared = b""  # precomputed Box(s', C') key for MESSAGE
        self.send_nonce = 1
        self.peer_nonce = 0


def _frame_header(flags: int, size: int) -> bytes:
    if size > 255:
        return bytes((flags | FLAG_LONG,)) + size.to_bytes(8, "big")
    return bytes((flags, size))


def _command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes((len(name),)) + name + data
    return _frame_header(FLAG_COMMAND, len(body)) + body


def _metadata(props: dict[bytes, bytes]) -> bytes:
    return b"".join(bytes((len(k),)) + k + len(v).to_bytes(4, "big") + v for k, v in props.items())


def _parse_metadata(data: bytes) -> dict[bytes, bytes]:
    props, i = {}, 0
    while i < len(data):
        n = data[i]
        if n == 0 or i + 1 + n + 4 > len(data):
            raise _Drop("handshake", "malformed metadata")
        name = data[i + 1:i + 1 + n]
        i += 1 + n
        size = int.from_bytes(data[i:i + 4], "big")
        i += 4
        if i + size > len(data):
            raise _Drop("handshake", "malformed metadata")
        props[name.lower()] = data[i:i + size]
        i += size
    return props


def _as_bytes_view(frame: Any) -> memoryview:
    mv = memoryview(frame)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


_READY_METADATA = _metadata({b"Socket-Type": b"ROUTER"})


class RouterServer:
    """Serves a :class:`Listener` in one I/O thread; complete requests appear in :attr:`requests`."""

    def __init__(self, listener: Listener, limits: Limits, curve: CurveKeys | None = None, name: str = "zmtp") -> None:
        self.listener = listener
        self.limits = limits
        self.curve = curve
        self.name = name
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.stats: dict[str, Any] = {"connections": 0, "connections_accepted": 0, "abandoned": 0,
                                      "dropped": dict.fromkeys(DROP_REASONS, 0)}
        self._conns: dict[int, _Conn] = {}
        self._ids = itertools.count(1)
        self._replies: deque[tuple[Request, list[Any]]] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._sel: selectors.BaseSelector | None = None
        self._greeting = (b"\xff" + bytes(8) + b"\x7f" + bytes((3, 1))
                          + (b"CURVE" if curve else b"NULL").ljust(20, b"\0")
                          + bytes((1 if curve else 0,)) + bytes(31))
        if curve is not None:
            self._long_term = nacl.public.PrivateKey(curve.secret)

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
                self._check_timers(time.monotonic())
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            sel.close()
            self.listener.close()

    def _guard(self, conn: _Conn, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except _Drop as exc:
            self._drop(conn, exc.reason)
        except OSError:
            self._close(conn)  # reset by the peer, broken pipe
        except Exception:  # a bug must cost one connection, never the server
            log.exception("%s: connection %d dropped after an unexpected error", self.name, conn.id)
            self._drop(conn, "protocol")

    # -- bookkeeping --------------------------------------------------------------------------------

    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of file descriptors, a connection reset before accept
                return
            if len(self._conns) >= self.limits.max_connections:
                self.stats["dropped"]["connection_cap"] += 1
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(next(self._ids), sock, now)
            self._conns[conn.id] = conn
            self.stats["connections"] = len(self._conns)
            self.stats["connections_accepted"] += 1
            self._queue(conn, [self._greeting])
            self._guard(conn, self._flush, conn, now)
            self._interest(conn)

    def _drop(self, conn: _Conn, reason: str) -> None:
        self.stats["dropped"][reason] += 1
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
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
        self._conns.pop(conn.id, None)
        self.stats["connections"] = len(self._conns)

    def _interest(self, conn: _Conn) -> None:
        if conn.closed or self._sel is None:
            return
        mask = 0
        if conn.request is None and conn.out_bytes <= self.limits.max_pending_reply_bytes:
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

    def _deadline(self, conn: _Conn) -> float:
        lim = self.limits
        if conn.state != _READY:
            return conn.created + lim.request_timeout_s
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
            if conn.state != _READY:
                self._drop(conn, "handshake")
            elif conn.out:
                self._drop(conn, "reply_timeout")
            elif conn.msg_started is not None:
                self._drop(conn, "request_timeout")
            else:
                self._drop(conn, "idle_timeout")

    # -- sending ------------------------------------------------------------------------------------

    def _queue(self, conn: _Conn, buffers: list[Any]) -> None:
        for b in buffers:
            mv = _as_bytes_view(b)
            if mv.nbytes:
                conn.out.append(mv)
                conn.out_bytes += mv.nbytes

    def _flush(self, conn: _Conn, now: float) -> None:
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

    def _send_message(self, conn: _Conn, frames: list[Any], now: float) -> None:
        views = [_as_bytes_view(f) for f in frames] or [memoryview(b"")]
        last = len(views) - 1
        for i, mv in enumerate(views):
            more = FLAG_MORE if i < last else 0
            if self.curve is None:
                self._queue(conn, [_frame_header(more, mv.nbytes), mv])
            else:
                self._queue(conn, self._encrypt(conn, b"".join((bytes((more,)), mv))))
        self._flush(conn, now)

    def _encrypt(self, conn: _Conn, plaintext: bytes) -> list[Any]:
        """One CURVE MESSAGE frame; ``plaintext`` starts with the flags byte (0x01 MORE, 0x02 COMMAND)."""
        short = conn.send_nonce.to_bytes(8, "big")
        conn.send_nonce += 1
        box = nacl.bindings.crypto_box_easy_afternm(plaintext, b"CurveZMQMESSAGES" + short, conn.shared)
        head = b"\x07MESSAGE" + short
        return [_frame_header(0, len(head) + len(box)), head, box]

    def _send_command(self, conn: _Conn, name: bytes, data: bytes) -> None:
        if self.curve is None or conn.state != _READY:
            self._queue(conn, [_command(name, data)])
        else:
            self._queue(conn, self._encrypt(conn, b"\x02" + bytes((len(name),)) + name + data))

    # -- receiving ----------------------------------------------------------------------------------

    def _on_readable(self, conn: _Conn, now: float) -> None:
        budget = READ_BUDGET
        while budget > 0 and not conn.closed and conn.request is None:
            try:
                if conn.body is not None:
                    n = conn.sock.recv_into(memoryview(conn.body)[conn.filled:])
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
            if conn.body is not None:
                conn.filled += n
                if conn.filled < len(conn.body):
                    continue
                body, conn.body = conn.body, None
                self._on_frame(conn, conn.body_flags, body, now)
            else:
                conn.rbuf += data
            self._feed(conn, now)
        self._interest(conn)

    def _feed(self, conn: _Conn, now: float) -> None:
        """Take every complete greeting or frame from the read buffer (none while a request is being handled)."""
        rbuf = conn.rbuf
        cap = self.limits.max_pending_reply_bytes
        while not conn.closed and conn.request is None and conn.body is None and conn.out_bytes <= cap:
            if conn.state == _GREETING:
                if rbuf and rbuf[0] != 0xFF:
                    raise _Drop("handshake", "not a ZMTP greeting")
                if len(rbuf) < GREETING_LEN:
                    return
                greeting = bytes(rbuf[:GREETING_LEN])
                del rbuf[:GREETING_LEN]
                self._on_greeting(conn, greeting)
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
            else:  # a large frame: read straight into its own buffer, sized once the limits allow it
                conn.body = bytearray(size)
                conn.body[:len(rbuf)] = rbuf
                conn.filled = len(rbuf)
                conn.body_flags = flags
                rbuf.clear()

    def _check_frame(self, conn: _Conn, flags: int, size: int, now: float) -> None:
        """The limits, from a frame's header alone: nothing of its body is read or allocated if it breaks one."""
        if flags & ~(FLAG_MORE | FLAG_LONG | FLAG_COMMAND):
            raise _Drop("protocol", f"reserved flag bits {flags:#04x}")
        if conn.state != _READY:
            if not flags & FLAG_COMMAND or size > HANDSHAKE_FRAME_MAX:
                raise _Drop("handshake", "expected a handshake command")
            return
        lim = self.limits
        if self.curve is not None:
            if size < CURVE_OVERHEAD:
                raise _Drop("protocol", "CURVE frame shorter than a MESSAGE")
            payload = size - CURVE_OVERHEAD
        elif flags & FLAG_COMMAND:
            if conn.parts or size > COMMAND_FRAME_MAX:
                raise _Drop("protocol", "command inside a message, or too large")
            return
        else:
            payload = size
        if len(conn.parts) + 1 > lim.max_frames:
            raise _Drop("too_many_frames", f"more than {lim.max_frames} frames")
        if conn.parts_bytes + payload > lim.max_message_bytes:
            raise _Drop("message_too_large", f"more than {lim.max_message_bytes} bytes")
        if conn.msg_started is None:
            conn.msg_started = now

    def _on_frame(self, conn: _Conn, flags: int, body: bytes | bytearray, now: float) -> None:
        if conn.state == _HELLO:
            self._on_hello(conn, bytes(body))
        elif conn.state == _INITIATE:
            self._on_initiate(conn, bytes(body))
        elif conn.state == _NULL_READY:
            self._on_null_ready(conn, bytes(body))
        elif self.curve is not None:
            inner, payload = self._decrypt(conn, body)
            if inner & 0x02:
                if conn.parts:
                    raise _Drop("protocol", "command inside a message")
                conn.msg_started = None
                self._on_command(conn, bytes(payload))
            else:
                self._on_data(conn, bool(inner & FLAG_MORE), payload)
        elif flags & FLAG_COMMAND:
            self._on_command(conn, bytes(body))
        else:
            self._on_data(conn, bool(flags & FLAG_MORE), body)

    def _on_data(self, conn: _Conn, more: bool, payload: Any) -> None:
        conn.parts.append(payload)
        conn.parts_bytes += len(payload)
        if more:
            return
        request = Request(conn.id, conn.parts)
        conn.parts, conn.parts_bytes, conn.msg_started = [], 0, None
        conn.request = request
        self.requests.put(request)

    def _on_command(self, conn: _Conn, body: bytes) -> None:
        if not body or len(body) < 1 + body[0]:
            raise _Drop("protocol", "malformed command")
        name, data = body[1:1 + body[0]], body[1 + body[0]:]
        if name == b"PING":
            if len(data) < 2 or len(data) > 18:
                raise _Drop("protocol", "malformed PING")
            self._send_command(conn, b"PONG", data[2:])
            self._flush(conn, time.monotonic())
        elif name == b"ERROR":
            self._close(conn)
        # PONG, SUBSCRIBE, CANCEL and commands of later versions: nothing to do

    # -- handshakes ---------------------------------------------------------------------------------

    def _on_greeting(self, conn: _Conn, g: bytes) -> None:
        if not g[9] & 0x01 or g[10] < 3:
            raise _Drop("handshake", f"ZMTP version {g[10]}; allowed: 3.x")
        mechanism = g[12:32].rstrip(b"\0")
        if mechanism != (b"CURVE" if self.curve else b"NULL"):
            raise _Drop("handshake" if self.curve is None or mechanism != b"NULL" else "unauthorized",
                        f"mechanism {mechanism!r}")
        if self.curve is None:
            self._queue(conn, [_command(b"READY", _READY_METADATA)])
            self._flush(conn, time.monotonic())
            conn.state = _NULL_READY
        else:
            conn.state = _HELLO

    def _check_peer(self, props: dict[bytes, bytes]) -> None:
        kind = props.get(b"socket-type")
        if kind not in PEER_SOCKET_TYPES:
            raise _Drop("handshake", f"Socket-Type {kind!r}; allowed: DEALER, REQ, ROUTER")

    def _on_null_ready(self, conn: _Conn, body: bytes) -> None:
        if not body.startswith(b"\x05READY"):
            raise _Drop("handshake", "expected READY")
        self._check_peer(_parse_metadata(body[6:]))
        conn.state = _READY

    def _on_hello(self, conn: _Conn, body: bytes) -> None:
        assert self.curve is not None
        if len(body) != 200 or not body.startswith(b"\x05HELLO") or body[6:8] != b"\x01\x00":
            raise _Drop("handshake", "malformed HELLO")
        conn.client_transient = body[80:112]
        try:
            nacl.public.Box(self._long_term, nacl.public.PublicKey(conn.client_transient)).decrypt(
                body[120:200], b"CurveZMQHELLO---" + body[112:120])
        except nacl.exceptions.CryptoError:
            raise _Drop("handshake", "HELLO box does not open (wrong server key?)") from None
        conn.peer_nonce = int.from_bytes(body[112:120], "big")
        conn.transient = nacl.public.PrivateKey.generate()
        conn.cookie_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
        cookie_nonce = nacl.utils.random(16)
        cookie = cookie_nonce + nacl.secret.SecretBox(conn.cookie_key).encrypt(
            conn.client_transient + bytes(conn.transient), b"COOKIE--" + cookie_nonce).ciphertext
        welcome_nonce = nacl.utils.random(16)
        box = nacl.public.Box(self._long_term, nacl.public.PublicKey(conn.client_transient)).encrypt(
            bytes(conn.transient.public_key) + cookie, b"WELCOME-" + welcome_nonce).ciphertext
        self._queue(conn, [_command(b"WELCOME", welcome_nonce + box)])
        self._flush(conn, time.monotonic())
        conn.state = _INITIATE

    def _on_initiate(self, conn: _Conn, body: bytes) -> None:
        assert self.curve is not None and conn.transient is not None
        if len(body) < 257 or not body.startswith(b"\x08INITIATE"):
            raise _Drop("handshake", "malformed INITIATE")
        try:
            cookie = nacl.secret.SecretBox(conn.cookie_key).decrypt(body[25:105], b"COOKIE--" + body[9:25])
            if cookie != conn.client_transient + bytes(conn.transient):
                raise _Drop("handshake", "INITIATE cookie is not ours")
            session = nacl.public.Box(conn.transient, nacl.public.PublicKey(conn.client_transient))
            plain = session.decrypt(body[113:], b"CurveZMQINITIATE" + body[105:113])
            client_key = plain[:32]
            vouch = nacl.public.Box(conn.transient, nacl.public.PublicKey(client_key)).decrypt(
                plain[48:128], b"VOUCH---" + plain[32:48])
        except nacl.exceptions.CryptoError:
            raise _Drop("handshake", "INITIATE box does not open") from None
        if vouch != conn.client_transient + self.curve.public:
            raise _Drop("handshake", "INITIATE vouch does not match")
        if client_key not in self.curve.allowed:
            # the client learns why (ZAP status 400) before it is disconnected
            with contextlib.suppress(OSError):
                conn.sock.send(_command(b"ERROR", b"\x03400"))
            raise _Drop("unauthorized", "client key not on the allow-list")
        self._check_peer(_parse_metadata(plain[128:]))
        conn.peer_nonce = int.from_bytes(body[105:113], "big")
        conn.shared = session.shared_key()
        short = conn.send_nonce.to_bytes(8, "big")
        conn.send_nonce += 1
        ready = session.encrypt(_READY_METADATA, b"CurveZMQREADY---" + short).ciphertext
        self._queue(conn, [_command(b"READY", short + ready)])
        self._flush(conn, time.monotonic())
        conn.state = _READY
        conn.cookie_key = b""
        conn.transient = None

    def _decrypt(self, conn: _Conn, body: bytes | bytearray) -> tuple[int, memoryview]:
        if body[:8] != b"\x07MESSAGE":
            raise _Drop("protocol", "expected a CURVE MESSAGE")
        short = bytes(body[8:16])
        nonce = int.from_bytes(short, "big")
        if nonce <= conn.peer_nonce:
            raise _Drop("protocol", "CURVE nonce reused")
        try:
            plain = nacl.bindings.crypto_box_open_easy_afternm(bytes(memoryview(body)[16:]),
                                                               b"CurveZMQMESSAGEC" + short, conn.shared)
        except nacl.exceptions.CryptoError:
            raise _Drop("protocol", "CURVE MESSAGE box does not open") from None
        conn.peer_nonce = nonce
        if not plain or plain[0] & ~0x03:
            raise _Drop("protocol", "CURVE MESSAGE flags")
        return plain[0], memoryview(plain)[1:]
