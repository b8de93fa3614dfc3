"""ZMTP 3.x on the wire, sans I/O: the greeting, frame headers, commands and their metadata.

rfc.zeromq.org/spec/37 (ZMTP 3.1; 3.0 peers too, spec 23). What a peer sends
is checked here and refused with :class:`Drop`, which names the reason its
connection is closed for (one of :data:`DROP_REASONS`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "COMMAND_FRAME_MAX", "DROP_REASONS", "Drop", "FLAG_COMMAND", "FLAG_LONG", "FLAG_MORE", "GREETING", "GREETING_LEN",
    "HANDSHAKE_FRAME_MAX", "READY", "READY_METADATA", "as_bytes_view", "check_greeting", "check_peer", "command",
    "frame_header", "greeting", "metadata", "parse_metadata",
]

GREETING_LEN = 64
FLAG_MORE, FLAG_LONG, FLAG_COMMAND = 0x01, 0x02, 0x04
#: largest command frame accepted during a handshake (HELLO is 200 bytes, INITIATE 257 + metadata)
HANDSHAKE_FRAME_MAX = 16 * 1024
#: largest command frame accepted after it (PING is at most 24 bytes)
COMMAND_FRAME_MAX = 4 * 1024
PEER_SOCKET_TYPES = frozenset({b"DEALER", b"REQ", b"ROUTER"})

#: a connection's first state (the peer's greeting is due) and its last (messages flow); a security
#: mechanism's handshake leads from one to the other
GREETING, READY = "greeting", "ready"

#: why connections were closed by the server (keys of ``stats["dropped"]``)
DROP_REASONS = (
    "message_too_large", "too_many_frames", "request_timeout", "reply_timeout", "idle_timeout",
    "connection_cap", "handshake", "handshake_evicted", "memory_budget", "unauthorized", "protocol",
)


class Drop(Exception):
    """The peer broke the protocol or a limit: its connection is closed, counted under ``reason``.

    ``farewell``, if any, is sent to the peer first, as well as it can be (a
    ZMTP ERROR command telling a client why it is refused).
    """

    def __init__(self, reason: str, detail: str = "", farewell: bytes = b"") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.farewell = farewell


def greeting(mechanism: bytes, as_server: bool) -> bytes:
    """This side's 64-byte greeting: signature, version 3.1, the security mechanism, the as-server flag."""
    return (b"\xff" + bytes(8) + b"\x7f" + bytes((3, 1)) + mechanism.ljust(20, b"\0")
            + bytes((1 if as_server else 0,)) + bytes(31))


def check_greeting(g: bytes, mechanism: bytes) -> None:
    """The peer's greeting must be ZMTP 3.x and name ``mechanism``; a NULL peer of a CURVE server is unauthorized."""
    if not g[9] & 0x01 or g[10] < 3:
        raise Drop("handshake", f"ZMTP version {g[10]}; allowed: 3.x")
    theirs = g[12:32].rstrip(b"\0")
    if theirs != mechanism:
        raise Drop("unauthorized" if mechanism == b"CURVE" and theirs == b"NULL" else "handshake",
                   f"mechanism {theirs!r}")


def frame_header(flags: int, size: int) -> bytes:
    if size > 255:
        return bytes((flags | FLAG_LONG,)) + size.to_bytes(8, "big")
    return bytes((flags, size))


def command(name: bytes, data: bytes = b"") -> bytes:
    """A whole command frame, header included."""
    body = bytes((len(name),)) + name + data
    return frame_header(FLAG_COMMAND, len(body)) + body


def metadata(props: dict[bytes, bytes]) -> bytes:
    return b"".join(bytes((len(k),)) + k + len(v).to_bytes(4, "big") + v for k, v in props.items())


def parse_metadata(data: bytes) -> dict[bytes, bytes]:
    props, i = {}, 0
    while i < len(data):
        n = data[i]
        if n == 0 or i + 1 + n + 4 > len(data):
            raise Drop("handshake", "malformed metadata")
        name = data[i + 1:i + 1 + n]
        i += 1 + n
        size = int.from_bytes(data[i:i + 4], "big")
        i += 4
        if i + size > len(data):
            raise Drop("handshake", "malformed metadata")
        props[name.lower()] = data[i:i + size]
        i += size
    return props


def check_peer(props: dict[bytes, bytes]) -> None:
    """The peer's READY metadata: a socket type that may talk to a ROUTER."""
    kind = props.get(b"socket-type")
    if kind not in PEER_SOCKET_TYPES:
        raise Drop("handshake", f"Socket-Type {kind!r}; allowed: DEALER, REQ, ROUTER")


def as_bytes_view(frame: Any) -> memoryview:
    mv = memoryview(frame)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


#: the metadata of the server's READY
READY_METADATA = metadata({b"Socket-Type": b"ROUTER"})
