"""The device server transport's limits and per-connection state: what :mod:`.zmtp`'s I/O thread keeps.

:class:`Limits` (what one peer, and all of them, may cost; checked at construction), :class:`Request` (a
complete message waiting for its reply) and the connection record, with the memory it holds counted as
:mod:`.zmtp` enforces it.
"""

from __future__ import annotations

import socket
import sys
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from pnn_cluster.servers import BindError
from pnn_cluster.servers.limits import (
    ZMQ_HANDSHAKE_TIMEOUT_S,
    ZMQ_HELD_FLOOR,
    ZMQ_IDLE_TIMEOUT_S,
    ZMQ_MAX_CONNECTIONS,
    ZMQ_MAX_FRAMES,
    ZMQ_MAX_HANDSHAKES,
    ZMQ_MAX_HANDSHAKES_PER_SOURCE,
    ZMQ_MAX_HELD_BYTES,
    ZMQ_MAX_MESSAGE_BYTES,
    ZMQ_MAX_PENDING_REPLY_BYTES,
    ZMQ_MESSAGE_CAP_MAX,
    ZMQ_REQUEST_TIMEOUT_S,
)
from pnn_cluster.servers.zmtp_codec import GREETING

__all__ = ["BUFFER_OVERHEAD", "Conn", "Limits", "READ_CHUNK", "Request", "least_along"]

#: bytes read from a socket at once
READ_CHUNK = 64 * 1024
#: what a queued reply buffer costs beyond its bytes: the memoryview and the object it views
BUFFER_OVERHEAD = sys.getsizeof(memoryview(b"")) + sys.getsizeof(b"")
#: how far a handshake has got, for eviction: the least far go first
SILENT, SPOKE, GREETED = 0, 1, 2


@dataclass(frozen=True)
class Limits:
    """What one peer may cost the server; see the module docstring for what each bounds, :mod:`.limits` for the
    defaults and ranges. The frame count has no default: it is the wire protocol's."""

    max_message_bytes: int = ZMQ_MESSAGE_CAP_MAX
    max_frames: int = field(kw_only=True)
    max_connections: int = ZMQ_MAX_CONNECTIONS.default
    idle_timeout_s: float = ZMQ_IDLE_TIMEOUT_S.default
    request_timeout_s: float = ZMQ_REQUEST_TIMEOUT_S.default
    max_pending_reply_bytes: int = ZMQ_MAX_PENDING_REPLY_BYTES.default
    max_handshakes: int = ZMQ_MAX_HANDSHAKES.default
    max_handshakes_per_source: int = ZMQ_MAX_HANDSHAKES_PER_SOURCE.default
    handshake_timeout_s: float = ZMQ_HANDSHAKE_TIMEOUT_S.default
    #: None: :meth:`default_held_bytes` of the others
    max_held_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_held_bytes is None:
            object.__setattr__(self, "max_held_bytes", self.default_held_bytes(self.max_message_bytes,
                                                                               self.max_pending_reply_bytes))
        ints = {"max_message_bytes": ZMQ_MAX_MESSAGE_BYTES, "max_frames": ZMQ_MAX_FRAMES,
                "max_connections": ZMQ_MAX_CONNECTIONS, "max_pending_reply_bytes": ZMQ_MAX_PENDING_REPLY_BYTES,
                "max_handshakes": ZMQ_MAX_HANDSHAKES, "max_handshakes_per_source": ZMQ_MAX_HANDSHAKES_PER_SOURCE,
                "max_held_bytes": ZMQ_MAX_HELD_BYTES}
        for name, limit in ints.items():
            v, lo, hi = getattr(self, name), limit.low, limit.high
            if not (isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi):
                raise BindError(f"{name}: {v!r}; allowed: integers {lo}..{hi}")
        for name, limit in (("idle_timeout_s", ZMQ_IDLE_TIMEOUT_S), ("request_timeout_s", ZMQ_REQUEST_TIMEOUT_S),
                            ("handshake_timeout_s", ZMQ_HANDSHAKE_TIMEOUT_S)):
            v, lo, hi = getattr(self, name), limit.low, limit.high
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and lo < v <= hi):
                raise BindError(f"{name}: {v!r}; allowed: seconds, {lo:g} < s <= {hi:g}")
        least = self.max_message_bytes + 2 * READ_CHUNK
        if self.max_held_bytes < least:
            raise BindError(f"max_held_bytes: {self.max_held_bytes}; allowed: at least max_message_bytes + "
                            f"{2 * READ_CHUNK} ({least}), room for one whole request as it arrives")

    @staticmethod
    def default_held_bytes(max_message_bytes: int, max_pending_reply_bytes: int) -> int:
        """Room for two whole requests (one arriving, one being handled) and one client's pending replies."""
        return max(ZMQ_HELD_FLOOR, 2 * max_message_bytes + max_pending_reply_bytes + 2 * READ_CHUNK)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- connections -------------------------------------------------------------------------------------------


class Request:
    """One complete multipart message from a peer (``frames``), waiting for its reply."""

    __slots__ = ("conn_id", "frames", "nbytes", "cancelled")

    def __init__(self, conn_id: int, frames: list[Any], nbytes: int = 0) -> None:
        self.conn_id = conn_id
        self.frames = frames
        self.nbytes = nbytes  # its frames' bytes, held until the reply is taken
        self.cancelled = False  # set when its connection closes before the reply is sent


class Conn:
    """One peer: its socket, what has been read of its current frame and message, what waits to be sent."""

    def __init__(self, cid: int, sock: socket.socket, now: float, source: str = "") -> None:
        self.id = cid
        self.sock = sock
        self.source = source  # the peer's address, without the port
        self.state = GREETING
        self.progress = SILENT  # how far its handshake has got (+1 per handshake command)
        self.round = 0  # the I/O loop's round it was accepted in
        self.closed = False
        self.events = 0
        self.rbuf = bytearray()
        self.body: bytearray | None = None  # the body of a frame too large for rbuf, growing as it arrives
        self.body_size = 0  # what its header declared
        self.filled = 0
        self.body_flags = 0
        self.parts: list[Any] = []
        self.parts_bytes = 0
        self.msg_started: float | None = None
        self.request: Request | None = None
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.created = self.last_activity = self.last_write = now
        self.security: Any = None  # the security mechanism's own state for this connection

    def out_held(self) -> int:
        """Memory held by replies waiting to be sent: their bytes and each buffer's overhead."""
        return self.out_bytes + len(self.out) * BUFFER_OVERHEAD

    def incomplete(self) -> int:
        """Memory held by input not yet a whole request: the read buffer, a frame arriving, parts of a message."""
        return len(self.rbuf) + (len(self.body) if self.body is not None else 0) + self.parts_bytes

    def held(self) -> int:
        return self.incomplete() + (self.request.nbytes if self.request is not None else 0) + self.out_held()


def least_along(conn: Conn) -> tuple[int, float]:
    """The order in which handshaking connections are evicted: least far first, then oldest."""
    return conn.progress, conn.created
