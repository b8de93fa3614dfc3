"""The server side of ZMTP's security mechanisms, sans I/O: NULL, and CURVE (encryption and an allow-list).

A mechanism leads a connection from its greeting to :data:`~.zmtp_codec.READY`
(what to answer each handshake command, and the connection's next state) and
then seals every frame the server sends and opens every frame it receives.

* NULL: the server's READY, the peer's READY; frames go as they are.
* CURVE (spec 25, ZMTP-CURVE, with the CurveZMQ handshake of spec 26): HELLO,
  WELCOME with a cookie, INITIATE with the client's vouch, READY, then every
  frame as an encrypted MESSAGE. A client is admitted only if its long-term
  public key is on the allow-list; otherwise it gets an ERROR command and is
  disconnected.

A peer that breaks the handshake raises :class:`~.zmtp_codec.Drop`.
"""

from __future__ import annotations

from typing import Any, Protocol

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.secret
import nacl.utils

from pnn_cluster.servers.curve_keys import CurveKeys
from pnn_cluster.servers.zmtp_codec import (
    COMMAND_FRAME_MAX,
    FLAG_COMMAND,
    FLAG_MORE,
    READY,
    READY_METADATA,
    Drop,
    check_peer,
    command,
    frame_header,
    parse_metadata,
)

__all__ = ["CurveMechanism", "Mechanism", "NullMechanism", "mechanism_for"]

#: what CURVE adds to each frame: "\x07MESSAGE", the short nonce, the MAC and the flags byte
CURVE_OVERHEAD = 8 + 8 + 16 + 1

# handshake states, between GREETING and READY
_HELLO, _INITIATE, _NULL_READY = "hello", "initiate", "ready-cmd"


class Connection(Protocol):
    """What a mechanism needs of a connection: its state, and a place for its own per-connection state."""

    state: str
    parts: list[Any]
    security: Any


class Mechanism(Protocol):
    name: bytes

    def start(self, conn: Connection) -> list[bytes]:
        """The peer's greeting named this mechanism: what the server sends now."""

    def handshake(self, conn: Connection, body: bytes) -> list[bytes]:
        """One handshake command from the peer: what the server answers (it sets ``conn.state``)."""

    def payload_size(self, conn: Connection, flags: int, size: int) -> int | None:
        """From a frame's header, after the handshake: its payload's size, or None for a command frame."""

    def open(self, conn: Connection, flags: int, body: Any) -> tuple[bool, bool, Any]:
        """A frame received after the handshake -> (is a command, more frames follow, payload)."""

    def seal(self, conn: Connection, more: int, payload: memoryview) -> list[Any]:
        """One frame of a message to send (``more``: FLAG_MORE or 0): its pieces, the payload not copied."""

    def seal_command(self, conn: Connection, name: bytes, data: bytes) -> list[Any]:
        """A command to send after the handshake."""


def mechanism_for(curve: CurveKeys | None) -> Mechanism:
    return NullMechanism() if curve is None else CurveMechanism(curve)


class NullMechanism:
    """No security: any peer that completes the READY exchange is served."""

    name = b"NULL"

    def start(self, conn: Connection) -> list[bytes]:
        conn.state = _NULL_READY
        return [command(b"READY", READY_METADATA)]

    def handshake(self, conn: Connection, body: bytes) -> list[bytes]:
        if not body.startswith(b"\x05READY"):
            raise Drop("handshake", "expected READY")
        check_peer(parse_metadata(body[6:]))
        conn.state = READY
        return []

    def payload_size(self, conn: Connection, flags: int, size: int) -> int | None:
        if flags & FLAG_COMMAND:
            if conn.parts or size > COMMAND_FRAME_MAX:
                raise Drop("protocol", "command inside a message, or too large")
            return None
        return size

    def open(self, conn: Connection, flags: int, body: Any) -> tuple[bool, bool, Any]:
        return bool(flags & FLAG_COMMAND), bool(flags & FLAG_MORE), body

    def seal(self, conn: Connection, more: int, payload: memoryview) -> list[Any]:
        return [frame_header(more, payload.nbytes), payload]

    def seal_command(self, conn: Connection, name: bytes, data: bytes) -> list[Any]:
        return [command(name, data)]


class _CurveState:
    """One connection's CURVE keys and nonces: the handshake's, then the session's."""

    def __init__(self) -> None:
        self.client_transient = b""
        self.transient: nacl.public.PrivateKey | None = None
        self.cookie_key = b""
        self.shared = b""  # precomputed Box(s', C') key for MESSAGE
        self.send_nonce = 1
        self.peer_nonce = 0


class CurveMechanism:
    """CURVE with the server's long-term key pair; only clients whose public key is allowed get past INITIATE."""

    name = b"CURVE"

    def __init__(self, keys: CurveKeys) -> None:
        self.keys = keys
        self._long_term = nacl.public.PrivateKey(keys.secret)

    def start(self, conn: Connection) -> list[bytes]:
        conn.security = _CurveState()
        conn.state = _HELLO
        return []

    def handshake(self, conn: Connection, body: bytes) -> list[bytes]:
        if conn.state == _HELLO:
            return self._on_hello(conn.security, conn, body)
        return self._on_initiate(conn.security, conn, body)

    def _on_hello(self, cs: _CurveState, conn: Connection, body: bytes) -> list[bytes]:
        if len(body) != 200 or not body.startswith(b"\x05HELLO") or body[6:8] != b"\x01\x00":
            raise Drop("handshake", "malformed HELLO")
        cs.client_transient = body[80:112]
        try:
            nacl.public.Box(self._long_term, nacl.public.PublicKey(cs.client_transient)).decrypt(
                body[120:200], b"CurveZMQHELLO---" + body[112:120])
        except nacl.exceptions.CryptoError:
            raise Drop("handshake", "HELLO box does not open (wrong server key?)") from None
        cs.peer_nonce = int.from_bytes(body[112:120], "big")
        cs.transient = nacl.public.PrivateKey.generate()
        cs.cookie_key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
        cookie_nonce = nacl.utils.random(16)
        cookie = cookie_nonce + nacl.secret.SecretBox(cs.cookie_key).encrypt(
            cs.client_transient + bytes(cs.transient), b"COOKIE--" + cookie_nonce).ciphertext
        welcome_nonce = nacl.utils.random(16)
        box = nacl.public.Box(self._long_term, nacl.public.PublicKey(cs.client_transient)).encrypt(
            bytes(cs.transient.public_key) + cookie, b"WELCOME-" + welcome_nonce).ciphertext
        conn.state = _INITIATE
        return [command(b"WELCOME", welcome_nonce + box)]

    def _on_initiate(self, cs: _CurveState, conn: Connection, body: bytes) -> list[bytes]:
        assert cs.transient is not None
        if len(body) < 257 or not body.startswith(b"\x08INITIATE"):
            raise Drop("handshake", "malformed INITIATE")
        try:
            cookie = nacl.secret.SecretBox(cs.cookie_key).decrypt(body[25:105], b"COOKIE--" + body[9:25])
            if cookie != cs.client_transient + bytes(cs.transient):
                raise Drop("handshake", "INITIATE cookie is not ours")
            session = nacl.public.Box(cs.transient, nacl.public.PublicKey(cs.client_transient))
            plain = session.decrypt(body[113:], b"CurveZMQINITIATE" + body[105:113])
            client_key = plain[:32]
            vouch = nacl.public.Box(cs.transient, nacl.public.PublicKey(client_key)).decrypt(
                plain[48:128], b"VOUCH---" + plain[32:48])
        except nacl.exceptions.CryptoError:
            raise Drop("handshake", "INITIATE box does not open") from None
        if vouch != cs.client_transient + self.keys.public:
            raise Drop("handshake", "INITIATE vouch does not match")
        if client_key not in self.keys.allowed:
            # the client learns why (ZAP status 400) before it is disconnected
            raise Drop("unauthorized", "client key not on the allow-list", farewell=command(b"ERROR", b"\x03400"))
        check_peer(parse_metadata(plain[128:]))
        cs.peer_nonce = int.from_bytes(body[105:113], "big")
        cs.shared = session.shared_key()
        short = cs.send_nonce.to_bytes(8, "big")
        cs.send_nonce += 1
        ready = session.encrypt(READY_METADATA, b"CurveZMQREADY---" + short).ciphertext
        conn.state = READY
        cs.cookie_key = b""
        cs.transient = None
        return [command(b"READY", short + ready)]

    def payload_size(self, conn: Connection, flags: int, size: int) -> int | None:
        if size < CURVE_OVERHEAD:
            raise Drop("protocol", "CURVE frame shorter than a MESSAGE")
        return size - CURVE_OVERHEAD  # a command or data: known once it is open

    def open(self, conn: Connection, flags: int, body: Any) -> tuple[bool, bool, Any]:
        cs: _CurveState = conn.security
        if body[:8] != b"\x07MESSAGE":
            raise Drop("protocol", "expected a CURVE MESSAGE")
        short = bytes(body[8:16])
        nonce = int.from_bytes(short, "big")
        if nonce <= cs.peer_nonce:
            raise Drop("protocol", "CURVE nonce reused")
        try:
            plain = nacl.bindings.crypto_box_open_easy_afternm(bytes(memoryview(body)[16:]),
                                                               b"CurveZMQMESSAGEC" + short, cs.shared)
        except nacl.exceptions.CryptoError:
            raise Drop("protocol", "CURVE MESSAGE box does not open") from None
        cs.peer_nonce = nonce
        if not plain or plain[0] & ~0x03:
            raise Drop("protocol", "CURVE MESSAGE flags")
        return bool(plain[0] & 0x02), bool(plain[0] & FLAG_MORE), memoryview(plain)[1:]

    def seal(self, conn: Connection, more: int, payload: memoryview) -> list[Any]:
        return self._encrypt(conn.security, b"".join((bytes((more,)), payload)))

    def seal_command(self, conn: Connection, name: bytes, data: bytes) -> list[Any]:
        return self._encrypt(conn.security, b"\x02" + bytes((len(name),)) + name + data)

    @staticmethod
    def _encrypt(cs: _CurveState, plaintext: bytes) -> list[Any]:
        """One CURVE MESSAGE frame; ``plaintext`` starts with the flags byte (0x01 MORE, 0x02 COMMAND)."""
        short = cs.send_nonce.to_bytes(8, "big")
        cs.send_nonce += 1
        box = nacl.bindings.crypto_box_easy_afternm(plaintext, b"CurveZMQMESSAGES" + short, cs.shared)
        head = b"\x07MESSAGE" + short
        return [frame_header(0, len(head) + len(box)), head, box]
